"""Stage 3, the model: a checkpoint -> a detector with the new label map, ready to run fast.

loading          checkpoint + class names -> model (only class-dependent tensors
                 re-learned); image processor; a fine-tuned detector for inference
speedups         the same computation, cheaper (frozen norms folded, in-place activations)
mixed_precision  the precision chosen for the device; heads kept in fp32 under autocast
"""
