"""Stage 6, inference: a fine-tuned detector on images.

detect         batched forward pass and post-processing to boxes in pixels
predict        image files, folders and globs -> detections, pictures, one COCO JSON
tiling         tiled inference: overlapping tiles plus the whole image, merged by NMS
video          a video -> an annotated video and one JSON of detections a frame
explain        decoder cross-attention of the top detections, as a figure
onnx_runtime   an exported ONNX model run by ONNX Runtime, as detect/predict/evaluate call it
"""
