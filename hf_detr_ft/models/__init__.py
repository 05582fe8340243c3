"""Stage 3, the model: a checkpoint -> a detector with the new label map, ready to run fast.

families         what differs between DETR-family types, in one table: input sizes,
                 class scoring, heads, backbone, frozen parts, the recipe's defaults
loading          checkpoint + class names -> model (only class-dependent tensors
                 re-learned); its family's image processor and input sizes
speedups         the same computation, cheaper (frozen norms folded, in-place activations)
mixed_precision  the precision chosen for the device; heads kept in fp32 under autocast
thresholds       the best-F1 score threshold saved in the config (``predict --threshold auto``)
"""
