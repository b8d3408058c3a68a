"""The circle task in a Lightning Fabric loop, driven by ``surgeon.Surgeon``.

Fabric handles devices, precision and processes; the surgeon handles the LR. Nothing is
Fabric-specific in the surgeon: under DDP (``--devices 2``) it averages the losses across
ranks before reading them, so every rank writes the same LRs and makes the same decisions.
``--nan-at N`` makes the loss of step N NaN on rank ``--nan-rank`` only (default: the last;
the update is skipped on every rank: DDP averages the gradients, so the NaN reaches them all).

    python examples/fabric_loop.py                          # one process
    python examples/fabric_loop.py --devices 2              # two CPU processes (gloo)
    python examples/fabric_loop.py --devices 2 --nan-at 200 --record runs/fabric-ranks
"""

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn
from toy_tasks import circle_points

from surgeon import Surgeon
from surgeon.demo import spiked


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (600)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak LR (0.1)")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--spike-at", type=int, default=None, help="20x losses here and next")
    parser.add_argument("--nan-at", type=int, default=None, help="a NaN loss at this step")
    parser.add_argument(
        "--nan-rank", type=int, default=-1, help="the rank whose loss is NaN (-1: the last)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", type=Path, default=None, help="write rank<r>.json here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Surgeon:
    args = parse_args(argv)
    strategy = "ddp" if args.devices > 1 else "auto"
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(args.seed)
    x, y = circle_points(4096, "uniform", args.seed + fabric.global_rank)  # data per rank
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    surgeon = Surgeon(optimizer, total_steps=args.steps, model=model)
    loss_fn = nn.BCEWithLogitsLoss()
    lrs: list[float] = []

    for step in range(args.steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        batch = torch.randint(len(x), (args.batch_size,))
        loss = loss_fn(model(x[batch]).squeeze(-1), y[batch])
        if spiked(step, args.spike_at):
            loss = loss * 20.0
        if step == args.nan_at and fabric.global_rank == args.nan_rank % fabric.world_size:
            loss = loss * float("nan")
        fabric.backward(loss)
        surgeon.guard(loss)
        optimizer.step()
        optimizer.zero_grad()
        surgeon.step(loss)
    surgeon.finish()

    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        record = {
            "lrs": lrs,
            "events": [[e.step, e.kind.value] for e in surgeon.events],
            "controller": json.dumps(surgeon.controller.state_dict(), sort_keys=True),
            "weights": [v for p in model.parameters() for v in p.detach().flatten().tolist()],
        }
        (args.record / f"rank{fabric.global_rank}.json").write_text(json.dumps(record))
    fabric.print(f"{len(surgeon.events)} events, final phase {surgeon.phase.value}")
    return surgeon


def close_process_group() -> None:
    """A clean exit under DDP: free the model's reducer and its pending work first, wait for
    both ranks, then close the group and leave without the interpreter's teardown (gloo's
    threads abort the process there now and then, after a run that went well)."""
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
    close_process_group()
