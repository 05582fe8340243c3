"""Stage 4, training: ``DetrTrainer`` (a ``transformers.Trainer``) and what guards a run.

trainer             DETR's optimizer groups, COCO evaluation, complete checkpoints
loss_normalisation  the multi-process box-loss fix, applied only while the trainer runs
preflight           checks before training that find what makes DETR not learn
signals             stop on divergence, warn on a plateau (``class_error``, NaN)
checkpoints         checkpoints that survive kills, exact resume, Ctrl-C
ema                 the weight average that is evaluated and saved
early_stopping      stop when the evaluation metric stops improving
console             what a run prints: a row per evaluation, the closing summary
"""
