"""Stage 7, artifacts: what a run leaves behind and publishes.

pictures          boxes drawn on images, figures saved without a GUI backend
training_report   loss and mAP plots, sample predictions from the saved model
error_report      confusion matrix, PR and F1 curves, worst images: pictures and JSON
model_card        the model card (README.md) with COCO metrics the Hub displays
hub               upload of an output directory to the Hugging Face Hub
onnx_export       ONNX export, its check against PyTorch, int8 / fp16 variants
onnx_usage        the export's README: inputs, outputs, numpy + onnxruntime usage code
"""
