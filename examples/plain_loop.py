"""The circle task in a plain PyTorch loop, driven by ``surgeon.Surgeon``: no Lightning.

The same controller, feed, guard and snapshots as ``ScheduleSurgeon``, behind a scheduler-like
object: ``surgeon.step(loss)`` once per optimizer step (it writes the next step's LR),
``surgeon.guard(loss)`` before ``optimizer.step()`` to skip NaN/inf updates, ``model=`` for
rollbacks. ``--spike-at N`` makes the losses of steps N and N + 1 20x worse, ``--nan-at N`` NaN.

    python examples/plain_loop.py                      # 1000 steps, a few seconds on a CPU
    python examples/plain_loop.py --spike-at 300 --nan-at 500 --out runs/plain
    surgeon plot runs/plain
"""

import argparse
from pathlib import Path

import torch
from torch import nn
from toy_tasks import circle_points

from surgeon import Surgeon
from surgeon.demo import spiked


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (1000)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak LR (0.1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--spike-at", type=int, default=None, help="20x losses here and next")
    parser.add_argument("--nan-at", type=int, default=None, help="a NaN loss at this step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run files for surgeon plot")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[Surgeon, float]:
    """Train; return the surgeon and the validation accuracy."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    x, y = circle_points(4096, "uniform", args.seed)
    x_val, y_val = circle_points(1024, "uniform", args.seed + 1)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    surgeon = Surgeon(optimizer, total_steps=args.steps, model=model, log_dir=args.out)
    loss_fn = nn.BCEWithLogitsLoss()

    for step in range(args.steps):
        batch = torch.randint(len(x), (args.batch_size,))
        loss = loss_fn(model(x[batch]).squeeze(-1), y[batch])
        if spiked(step, args.spike_at):
            loss = loss * 20.0
        if step == args.nan_at:
            loss = loss * float("nan")
        loss.backward()
        surgeon.guard(loss)  # a NaN/inf loss or gradient: this update is skipped
        optimizer.step()
        optimizer.zero_grad()
        surgeon.step(loss)  # read later, in blocks; writes the LR of the next step
    surgeon.finish()  # the last losses are decided on too

    with torch.no_grad():
        accuracy = ((model(x_val).squeeze(-1) > 0).float() == y_val).float().mean().item()
    print(f"\nvalidation accuracy after {args.steps} steps: {accuracy:.3f}")
    print(f"{len(surgeon.events)} events, final phase {surgeon.phase.value}, {surgeon!r}")
    return surgeon, accuracy


if __name__ == "__main__":
    main()
