"""Fine-tuning with ScheduleSurgeon: two param groups at a 1:10 LR ratio, backbone frozen first.

An MLP backbone is pretrained on 1000 of scikit-learn's 8x8 digits (a plain loop standing
in for loading a checkpoint), then fine-tuned with a new head on 100 other digits. The
optimizer has a ``backbone`` group at 1/10 of the ``head`` group's LR (discriminative
fine-tuning, as in ULMFiT); the backbone is frozen for the first ``--freeze-steps`` and
trained after (``requires_grad`` toggled in ``on_train_batch_start``). The surgeon is
``configs/presets/finetune.yaml``: it scales every group by the same factor, so the ratio
holds at every step; the script checks that in the logged LRs.

    python examples/finetune.py                      # 600 steps, under a minute on a CPU
    python examples/finetune.py --steps 300 --freeze-steps 100 --train-size 397
    surgeon plot runs/finetune
"""

import argparse
from pathlib import Path

import pytorch_lightning as pl
from toy_tasks import (
    DigitsData,
    DigitsFinetuner,
    add_run_args,
    make_trainer,
    preset,
    print_events,
    show_logs,
)

from surgeon import ScheduleSurgeon
from surgeon.plot import find_run_files, read_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser, steps=600, preset_name="finetune", out="runs/finetune")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="peak LR of the head (1e-2)")
    parser.add_argument(
        "--backbone-ratio", type=float, default=0.1, help="backbone LR / head LR (0.1)"
    )
    parser.add_argument(
        "--freeze-steps", type=int, default=None, help="steps with a frozen backbone (steps/6)"
    )
    parser.add_argument("--train-size", type=int, default=100, help="labelled digits (100)")
    return parser.parse_args(argv)


def lr_ratios(log_dir: Path) -> list[float]:
    """head LR / backbone LR at every step the run logged its LRs."""
    series = read_metrics(find_run_files(log_dir)[0])
    backbone = dict(series["lr-AdamW/backbone"])
    return [lr / backbone[step] for step, lr in series["lr-AdamW/head"]]


def main(argv: list[str] | None = None) -> tuple[ScheduleSurgeon, Path]:
    """Pretrain, then fine-tune; return the surgeon and the run's log directory."""
    args = parse_args(argv)
    show_logs()
    pl.seed_everything(args.seed, verbose=False)
    freeze = args.steps // 6 if args.freeze_steps is None else args.freeze_steps
    model = DigitsFinetuner(
        head_lr=args.head_lr,
        backbone_lr=args.head_lr * args.backbone_ratio,
        freeze_steps=freeze,
        seed=args.seed,
        spike_at=args.spike_at,
    )
    data = DigitsData(train_size=args.train_size, seed=args.seed)
    surgeon = preset(args.preset)
    trainer = make_trainer(args.out, args.steps, surgeon)
    trainer.fit(model, data)
    log_dir = Path(trainer.log_dir or args.out)

    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"\nvalidation accuracy after {trainer.global_step} steps: {accuracy:.3f}")
    if model.unfrozen_at is None:
        print(f"backbone frozen for all {trainer.global_step} steps" if freeze else "")
    elif freeze:
        print(f"backbone frozen for steps 0-{freeze - 1}, trained from step {model.unfrozen_at}")
    ratios = lr_ratios(log_dir)
    print(
        f"head LR / backbone LR at {len(ratios)} logged steps: "
        f"min {min(ratios):.6g}, max {max(ratios):.6g}"
    )
    print_events(surgeon, log_dir)
    return surgeon, log_dir


if __name__ == "__main__":
    main()
