"""Stage 2, the input pipeline: dataset examples -> augmented model inputs -> batches.

augmentation   the presets and saved albumentations pipelines, checked before training
transforms     albumentations augmentation, then the model's own image processor
image_cache    decoded training images kept between epochs
collate        padding to the batch's largest image, pixel mask
sampler        batches of similar aspect ratio (little padding)
"""
