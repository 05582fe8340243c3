"""Stage 5, evaluation: detections -> COCO metrics (pycocotools), overall and per class.

coco_metrics        ``CocoEvaluator``: post-processed detections -> the 12 COCO numbers
coco_metric_module  the same metric as an ``evaluate`` module (``evaluate.load(path)``)
evaluate            a fine-tuned model on one split of a dataset (``hf-detr-ft evaluate``)
onnx_evaluation     the same metrics of an exported ONNX model, run by ONNX Runtime
error_analysis      confusion matrix, PR curves per class, F1 vs score threshold, best threshold
"""
