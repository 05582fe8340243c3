"""Fine-tune DETR on a COCO dataset folder — the script form of `hf-detr-ft train`.

    python examples/train.py --dataset_dir data/signs --num_classes 3 --output_dir out
    accelerate launch examples/train.py --dataset_dir data/signs --num_classes 3 --output_dir out
    python examples/train.py config.json          # the same flags, from a file

Every flag of transformers.TrainingArguments works too (see --help).
"""

from hf_detr_ft.arguments import parse_train_args
from hf_detr_ft.run import run_training


def main() -> None:
    model_args, data_args, training_args = parse_train_args()
    result = run_training(model_args, data_args, training_args)
    if training_args.process_index == 0:
        mean_ap = result.metrics["eval_map"]
        print(f"Model saved to {result.output_dir}; {result.eval_split} mAP {mean_ap:.4f}")


if __name__ == "__main__":
    main()
