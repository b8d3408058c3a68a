"""Every YAML in ``configs/`` through ``LightningCLI`` (the ``SurgeonCLI`` of ``examples/cli.py``).

* presets (``configs/presets/*.yaml``, ``trainer.callbacks`` fragments) are layered over an
  example config and must yield exactly one ``ScheduleSurgeon`` with the preset's values
  (pinned here, types included: ``0.05`` is a fraction of the run, ``5`` would be 5 steps);
* complete configs (``configs/*.yaml``) parse, name their model and data, carry the surgeon
  of the preset they copy, and run 5 optimizer steps;
* a misspelled key fails in the parser with a message that names it.
"""

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from surgeon.callback import PEAK_LR_KEY, ScheduleSurgeon
from surgeon.config import CONFIG_FIELDS, SurgeonConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXAMPLES = REPO / "examples"
PRESETS = sorted((CONFIGS / "presets").glob("*.yaml"))
COMPLETE = sorted(CONFIGS.glob("*.yaml"))

EXPECTED_PRESETS: dict[str, dict[str, Any]] = {
    "llm_pretrain": {
        "warmup": "auto",
        "min_warmup": 0.005,
        "max_warmup": 0.05,
        "decay": "cosine",
        "min_lr_ratio": 0.1,
    },
    "finetune": {
        "warmup": "auto",
        "min_warmup": 0.01,
        "max_warmup": 0.06,
        "decay": "linear",
        "min_lr_ratio": 0.0,
    },
    "vision_from_scratch": {
        "warmup": "auto",
        "min_warmup": 0.02,
        "max_warmup": 0.05,
        "decay": "cosine",
        "min_lr_ratio": 0.0,
    },
}
"""The values each preset must give the surgeon; every other field keeps its default."""

COMPLETE_CONFIGS: dict[str, tuple[str, str, str | None]] = {
    "circle": ("CircleNet", "CircleData", None),
    "char_gpt": ("TinyCharLM", "CharData", "llm_pretrain"),
    "digits_finetune": ("DigitsFinetuner", "DigitsData", "finetune"),
}
"""Complete config -> (model class, data class, the preset its surgeon copies; None: defaults)."""


@pytest.fixture(scope="module")
def surgeon_cli() -> Iterator[type]:
    """``SurgeonCLI`` from ``examples/cli.py``, with ``examples/`` importable (``toy_tasks``) and
    pytest's own arguments out of ``sys.argv`` (LightningCLI warns when it sees both)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES))
        patch.setattr(sys, "argv", ["cli.py"])
        spec = importlib.util.spec_from_file_location("surgeon_examples_cli", EXAMPLES / "cli.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module.SurgeonCLI


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, especially on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse(cli_class: type, *args: str) -> Any:
    """Instantiate model, data and trainer from ``args``; run nothing."""
    return cli_class(args=list(args), run=False)


def surgeons(cli: Any) -> list[ScheduleSurgeon]:
    return [c for c in cli.trainer.callbacks if isinstance(c, ScheduleSurgeon)]


def assert_surgeon_has(surgeon: ScheduleSurgeon, expected: dict[str, Any]) -> None:
    """The surgeon's config is the defaults updated with ``expected``, types included."""
    want = {**{name: getattr(SurgeonConfig(), name) for name in CONFIG_FIELDS}, **expected}
    got = {name: getattr(surgeon.config, name) for name in CONFIG_FIELDS}
    assert got == want
    for name, value in expected.items():
        assert type(got[name]) is type(value), f"{name}: {got[name]!r} is not a {type(value)}"


def test_every_yaml_is_covered() -> None:
    assert {p.stem for p in PRESETS} == set(EXPECTED_PRESETS)
    assert {p.stem for p in COMPLETE} == set(COMPLETE_CONFIGS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_fragment_is_callbacks_only_and_matches_the_pinned_values(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert set(document) == {"trainer"} and set(document["trainer"]) == {"callbacks"}
    (callback,) = document["trainer"]["callbacks"]
    assert callback["class_path"] == "surgeon.ScheduleSurgeon"
    assert callback["init_args"] == EXPECTED_PRESETS[path.stem]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_over_an_example_config_gives_one_surgeon_with_its_values(
    surgeon_cli: type, path: Path
) -> None:
    cli = parse(surgeon_cli, "--config", str(CONFIGS / "circle.yaml"), "--config", str(path))
    (surgeon,) = surgeons(cli)
    assert_surgeon_has(surgeon, EXPECTED_PRESETS[path.stem])
    assert type(cli.model).__name__ == "CircleNet"  # the example config is still there
    assert cli.trainer.max_steps == 1000


def test_preset_keeps_callbacks_appended_after_it(surgeon_cli: type) -> None:
    """What the presets' comments promise: ``--trainer.callbacks+=`` adds to the fragment."""
    cli = parse(
        surgeon_cli,
        "--config",
        str(CONFIGS / "circle.yaml"),
        "--config",
        str(CONFIGS / "presets" / "finetune.yaml"),
        "--trainer.callbacks+=LearningRateMonitor",
    )
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("ScheduleSurgeon") == 1 and "LearningRateMonitor" in names


def test_example_scripts_build_the_same_surgeon_from_a_preset(surgeon_cli: type) -> None:
    """``toy_tasks.preset`` (what ``--preset NAME`` of the scripts uses) reads the same YAML."""
    toy_tasks = importlib.import_module("toy_tasks")
    for path in PRESETS:
        assert_surgeon_has(toy_tasks.preset(path.stem), EXPECTED_PRESETS[path.stem])
    assert_surgeon_has(toy_tasks.preset("defaults"), {})
    with pytest.raises(ValueError, match=r"no preset 'llm'; presets: defaults, finetune, llm_"):
        toy_tasks.preset("llm")


@pytest.mark.parametrize("path", COMPLETE, ids=lambda p: p.stem)
def test_complete_config_parses_with_its_model_data_and_surgeon(
    surgeon_cli: type, path: Path
) -> None:
    model_name, data_name, preset = COMPLETE_CONFIGS[path.stem]
    cli = parse(surgeon_cli, "--config", str(path))
    assert type(cli.model).__name__ == model_name
    assert type(cli.datamodule).__name__ == data_name
    (surgeon,) = surgeons(cli)
    assert_surgeon_has(surgeon, EXPECTED_PRESETS[preset] if preset else {})
    assert 0 < cli.trainer.max_steps <= 1000  # CPU-sized


def test_char_config_takes_vocab_size_and_context_from_the_data(surgeon_cli: type) -> None:
    cli = parse(surgeon_cli, "--config", str(CONFIGS / "char_gpt.yaml"), "--data.context=32")
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size == len(cli.datamodule.vocab)
    assert cli.model.hparams.context == cli.datamodule.hparams.context == 32


def test_misspelled_surgeon_key_names_the_key(
    surgeon_cli: type, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = yaml.safe_load((CONFIGS / "presets" / "llm_pretrain.yaml").read_text())
    init_args = document["trainer"]["callbacks"][0]["init_args"]
    init_args["min_warmpu"] = init_args.pop("min_warmup")
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(document))

    with pytest.raises(SystemExit) as exit_info:
        parse(surgeon_cli, "--config", str(CONFIGS / "circle.yaml"), "--config", str(bad))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "min_warmpu" in message and "is not accepted" in message


def test_out_of_range_surgeon_value_names_the_field(surgeon_cli: type) -> None:
    """Types are the parser's job; ranges are the surgeon's (``SurgeonConfig``)."""
    with pytest.raises(ValueError, match=r"max_warmup.*\(0, 1\].*max_warmup=1\.5"):
        parse(
            surgeon_cli,
            "--config",
            str(CONFIGS / "circle.yaml"),
            "--config",
            str(CONFIGS / "presets" / "llm_pretrain.yaml"),
            "--trainer.callbacks.init_args.max_warmup=1.5",
        )


@pytest.mark.parametrize("path", COMPLETE, ids=lambda p: p.stem)
def test_complete_config_runs_five_steps(
    surgeon_cli: type, path: Path, tmp_path: Path, one_thread: None
) -> None:
    cli = surgeon_cli(
        args=[
            "fit",
            "--config",
            str(path),
            "--trainer.max_steps=5",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    trainer = cli.trainer
    assert trainer.global_step == 5
    (surgeon,) = surgeons(cli)
    assert surgeon.controller is not None and surgeon.controller.total_steps == 5
    assert surgeon.step == 5
    log_dir = Path(trainer.log_dir)
    assert log_dir.is_relative_to(tmp_path)
    assert (log_dir / "events.jsonl").exists() and (log_dir / "config.yaml").exists()
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "surgeon/lr_scale" in header and any(h.startswith("lr-") for h in header)
    # the surgeon drove every group: each at the controller's scale for the last step
    scales = [g["lr"] / g[PEAK_LR_KEY] for g in trainer.optimizers[0].param_groups]
    last = surgeon.controller.lr_scale(surgeon.step - 1)
    assert scales == pytest.approx([last] * len(scales), rel=1e-12)
