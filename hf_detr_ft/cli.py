"""The ``hf-detr-ft`` command.

``hf-detr-ft train`` takes exactly the flags of ``examples/train.py`` (every field of the
argument dataclasses, i.e. all of ``TrainingArguments``); ``hf-detr-ft demo`` runs the offline
demo. Mistakes in the user's input end in one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import HfDetrFtError

COMMANDS = {
    "train": "fine-tune a DETR model on a COCO dataset folder (see `hf-detr-ft train --help`)",
    "demo": "offline demo: synthetic data, a few minutes of fine-tuning, mAP before/after",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="hf-detr-ft",
        description="Fine-tune DETR object detectors on your own data.",
        epilog="\n".join(f"  {name:<6} {text}" for name, text in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS, help="what to do")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command")
    args = parser.parse_args(argv[:1])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"train": train, "demo": demo}[args.command](argv[1:])
    except (HfDetrFtError, FileExistsError) as err:
        print(f"hf-detr-ft {args.command}: error: {err}", file=sys.stderr)
        return 2


def train(argv: list[str]) -> int:
    from .arguments import parse_train_args
    from .finetune import run_training

    model_args, data_args, training_args = parse_train_args(argv)
    result = run_training(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(
            f"\nSaved the fine-tuned model to {result.output_dir}; {result.eval_split} mAP "
            f"{result.metrics['eval_map']:.3f} (mAP50 {result.metrics['eval_map_50']:.3f})."
        )
    return 0


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-detr-ft demo", description=COMMANDS["demo"])
    parser.add_argument("--output_dir", default="hf-detr-ft-demo", help="where to write everything")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training")
    args = parser.parse_args(argv)

    from .demo import run_demo

    result = run_demo(args.output_dir, seed=args.seed)
    print(
        "\nhf-detr-ft demo: fine-tuned a small DETR on synthetic circles, squares, triangles\n"
        f"  mAP@[.5:.95]  before {result.map_before:.3f}  ->  after {result.map_after:.3f}\n"
        f"  mAP@.5        before {result.map50_before:.3f}  ->  after {result.map50_after:.3f}\n"
        f"  model:        {result.output_dir / 'model'}\n"
        f"  picture:      {result.picture} (ground truth left, predictions right)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
