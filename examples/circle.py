"""The circle data set with ScheduleSurgeon: is a 2-D point inside the circle x^2 + y^2 < 1.5?

The small problem of the classic learning-rate-schedule lesson: points uniform in
[-2, 2]^2 (or standard normal, ``--distribution gaussian``), a two-layer network
(2 -> 16 -> 1, ReLU), SGD with momentum. The surgeon takes the optimizer's LR as its peak,
ramps it up until the loss settles after its first descent, then decays it linearly to 0
(the defaults);
``--spike-at N`` makes the batches of steps N and N + 1 20x worse: a spike and its recovery.

    python examples/circle.py                        # 1000 steps, under a minute on a CPU
    python examples/circle.py --steps 300 --spike-at 150 --preset vision_from_scratch
    surgeon plot runs/circle                         # loss and LR with the events marked
"""

import argparse
from pathlib import Path

import pytorch_lightning as pl
from toy_tasks import (
    CircleData,
    CircleNet,
    add_run_args,
    make_trainer,
    preset,
    print_events,
    show_logs,
)

from surgeon import ScheduleSurgeon


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser, steps=1000, preset_name="defaults", out="runs/circle")
    parser.add_argument("--lr", type=float, default=0.1, help="peak LR (0.1)")
    parser.add_argument("--hidden", type=int, default=16, help="hidden units (16)")
    parser.add_argument("--distribution", choices=("uniform", "gaussian"), default="uniform")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[ScheduleSurgeon, Path]:
    """Train the circle network; return the surgeon and the run's log directory."""
    args = parse_args(argv)
    show_logs()
    pl.seed_everything(args.seed, verbose=False)
    data = CircleData(distribution=args.distribution, seed=args.seed)
    model = CircleNet(hidden=args.hidden, lr=args.lr, spike_at=args.spike_at)
    surgeon = preset(args.preset)
    trainer = make_trainer(args.out, args.steps, surgeon)
    trainer.fit(model, data)
    log_dir = Path(trainer.log_dir or args.out)
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"\nvalidation accuracy after {trainer.global_step} steps: {accuracy:.3f}")
    print_events(surgeon, log_dir)
    return surgeon, log_dir


if __name__ == "__main__":
    main()
