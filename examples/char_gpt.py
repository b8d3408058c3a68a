"""A tiny character-level GPT on Python's standard library, with the surgeon's LLM preset.

The model and the corpus are ``surgeon.demo``'s (a 2-layer causal transformer, 64 wide,
over the characters of a few standard-library modules; nothing is downloaded). The
surgeon is ``configs/presets/llm_pretrain.yaml``: the AdamW LR is the peak, automatic
warmup between 0.5% and 5% of the run, cosine to 10% of the peak. ``--spike-at N`` makes
the batches of steps N and N + 1 20x worse to show a spike and its recovery. At the end the model
writes a few lines of "Python".

    python examples/char_gpt.py                      # 600 steps, a minute or two on a CPU
    python examples/char_gpt.py --steps 300 --spike-at 200 --preset defaults
    surgeon plot runs/char_gpt
"""

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
from toy_tasks import CharData, add_run_args, make_trainer, preset, print_events, show_logs

from surgeon import ScheduleSurgeon
from surgeon.demo import TinyCharLM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser, steps=600, preset_name="llm_pretrain", out="runs/char_gpt")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak LR (3e-3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sample", type=int, default=200, help="characters to generate (200)")
    return parser.parse_args(argv)


@torch.no_grad()
def generate(model: TinyCharLM, data: CharData, prompt: str, length: int, seed: int) -> str:
    """``prompt`` continued by ``length`` characters sampled at temperature 0.8."""
    model.eval()
    index = {ch: i for i, ch in enumerate(data.vocab)}
    codes = torch.tensor([[index[ch] for ch in prompt]], device=model.device)
    generator = torch.Generator(model.device).manual_seed(seed)
    for _ in range(length):
        logits = model(codes[:, -model.hparams.context :])[0, -1] / 0.8
        code = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        codes = torch.cat([codes, code[None]], dim=1)
    return "".join(data.vocab[i] for i in codes[0].tolist())


def main(argv: list[str] | None = None) -> tuple[ScheduleSurgeon, Path]:
    """Train the tiny GPT; return the surgeon and the run's log directory."""
    args = parse_args(argv)
    show_logs()
    pl.seed_everything(args.seed, verbose=False)
    data = CharData(batch_size=args.batch_size, train_windows=args.steps * args.batch_size)
    context = data.hparams.context
    model = TinyCharLM(data.vocab_size, context=context, lr=args.lr, spike_at=args.spike_at)
    surgeon = preset(args.preset)
    trainer = make_trainer(args.out, args.steps, surgeon)
    trainer.fit(model, data)
    log_dir = Path(trainer.log_dir or args.out)
    val_loss = float(trainer.callback_metrics["val_loss"])
    print(f"\nvalidation loss after {trainer.global_step} steps: {val_loss:.3f} nats/char")
    if args.sample:
        print("sample:\n" + generate(model, data, "def ", args.sample, args.seed))
    print_events(surgeon, log_dir)
    return surgeon, log_dir


if __name__ == "__main__":
    main()
