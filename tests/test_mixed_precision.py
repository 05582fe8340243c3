"""bf16 autocast (``--bf16``) training steps on the CPU: a real Trainer run that learns."""

from __future__ import annotations

import torch
from transformers import set_seed

from hf_detr_ft.arguments import DetrTrainingArguments
from hf_detr_ft.collate import collate_fn
from hf_detr_ft.dataset import load_detection_dataset
from hf_detr_ft.modeling import load_image_processor, load_model
from hf_detr_ft.trainer import DetrTrainer
from hf_detr_ft.transforms import DetrTransform


def test_bf16_autocast_steps_reduce_the_loss(tiny_model_dir, shapes_dir, tmp_path) -> None:
    set_seed(0)
    data = load_detection_dataset(shapes_dir)
    processor = load_image_processor(tiny_model_dir, image_size=64, max_image_size=64)
    transform = DetrTransform.for_evaluation(processor)
    trainer = DetrTrainer(
        model=load_model(tiny_model_dir, data.class_names),
        args=DetrTrainingArguments(
            output_dir=str(tmp_path),
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            bf16=True,
            max_steps=40,
            learning_rate=3e-3,
            lr_backbone=3e-4,
            per_device_train_batch_size=4,
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
        ),  # fmt: skip
        train_dataset=data.splits["train"].select(range(4)).with_transform(transform),
        processing_class=processor,
        data_collator=collate_fn,
    )
    batch = collate_fn([trainer.train_dataset[i] for i in range(4)])
    seen_dtypes = set()
    hook = trainer.model.model.encoder.register_forward_hook(
        lambda module, args, output: seen_dtypes.add(output.last_hidden_state.dtype)
    )

    def loss() -> float:
        trainer.model.eval()
        with torch.no_grad():
            return trainer.model(**batch).loss.item()

    before = loss()
    trainer.train()
    hook.remove()
    after = loss()
    assert torch.bfloat16 in seen_dtypes  # the training steps really ran under bf16 autocast
    assert trainer.model.dtype == torch.float32  # weights (and the optimizer) stay in fp32
    assert after < 0.8 * before
