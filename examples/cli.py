"""The examples through ``LightningCLI``: model, data, trainer and the surgeon from YAML.

A full config in ``configs/`` names everything; a preset from ``configs/presets/`` layered
after it swaps the surgeon's settings (it replaces ``trainer.callbacks``); any value can be
overridden on the command line:

    python examples/cli.py fit --config configs/circle.yaml
    python examples/cli.py fit --config configs/char_gpt.yaml --trainer.max_steps 200
    python examples/cli.py fit --config configs/circle.yaml \\
        --config configs/presets/vision_from_scratch.yaml
    python examples/cli.py fit --config configs/digits_finetune.yaml --print_config

The classes are importable because this script's directory is on ``sys.path``
(``toy_tasks.CircleNet``, ...). ``SurgeonCLI`` links ``data.vocab_size`` into the model's
``vocab_size`` (for ``surgeon.demo.TinyCharLM``; a model without that argument ignores it)
and ``data.context`` into its ``context``. Each run logs to ``runs/cli/<name>/version_N``;
``surgeon plot runs/cli/<name>`` plots the newest.
"""

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from toy_tasks import print_events, show_logs

from surgeon import ScheduleSurgeon


class SurgeonCLI(LightningCLI):
    """``LightningCLI`` with the links the character model needs."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate"
        )
        parser.link_arguments("data.init_args.context", "model.init_args.context")

    def after_fit(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, ScheduleSurgeon):
                print_events(callback, self.trainer.log_dir)


def main(args: list[str] | None = None) -> SurgeonCLI:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``)."""
    show_logs()
    return SurgeonCLI(args=args)


if __name__ == "__main__":
    main()
