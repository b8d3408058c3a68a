"""``ScheduleSurgeon()`` dropped into a typical Lightning project (issue 15).

The project: AdamW with one named param group and a ``OneCycleLR`` returned from
``configure_optimizers``, ``train_loss`` on the progress bar, a validation loop, and
``LearningRateMonitor`` + ``ModelCheckpoint`` + ``EarlyStopping`` with TensorBoard and CSV
loggers, ``LearningRateMonitor`` listed *before* the surgeon. Each test asserts what the user
sees: the console (Lightning's rank-zero info lines), the loggers' files, ``callback_metrics``,
the progress bar, the checkpoints' names, and how the fit ends (``max_time``,
``EarlyStopping``, ``cool_down_now``).
"""

import csv
import importlib
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import docstring_parser
import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import make_loader
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from surgeon.callback import EVENT_CODES, PHASE_CODES, ScheduleSurgeon, lr_metric_names
from surgeon.controller import Controller, EventKind, Phase
from surgeon.plot import find_run_files

BATCHES = 20
"""Training batches per epoch (``make_loader``'s default is 10; 20 gives EarlyStopping room)."""
LR, MAX_LR = 1e-3, 3e-3
"""AdamW's configured LR and OneCycleLR's ``max_lr`` (which becomes the surgeon's peak)."""


def project_class(ns: ModuleType = pl) -> type:
    """A typical project's LightningModule for the namespace ``ns``."""

    class Project(ns.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(
            self,
            scheduler: str | None = "onecycle",
            val_script: list[float] | None = None,
            total_steps: int = 1000,
            tensor_lr: bool = False,
        ) -> None:
            """``scheduler``: ``"onecycle"``, ``"cosine"`` or ``None``; ``val_script``: the
            ``val_loss`` of each epoch (``None``: the real validation loss); ``tensor_lr``: the
            LR as a tensor (as compiled optimizer steps take it)."""
            super().__init__()
            self.save_hyperparameters(ignore=["val_script"])
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
            self.val_script = val_script
            self.records: list[dict[str, Any]] = []
            """Per training_step: Lightning's step and the LR the optimizer holds."""

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, prog_bar=True)
            lr = float(self.optimizers().param_groups[0]["lr"])
            self.records.append(
                {"step": self.trainer.fit_loop.epoch_loop._batches_that_stepped, "lr": lr}
            )
            return loss

        def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            if self.val_script is not None:
                loss = torch.tensor(
                    self.val_script[min(self.current_epoch, len(self.val_script) - 1)]
                )
            self.log("val_loss", loss)

        def configure_optimizers(self) -> Any:
            lr = torch.tensor(LR) if self.hparams.tensor_lr else LR
            lr = 0.0 if self.hparams.get("lr_zero") else lr
            opt = torch.optim.AdamW([{"params": self.parameters(), "name": "all"}], lr=lr)
            total = self.hparams.total_steps
            if self.hparams.scheduler is None:
                return opt
            if self.hparams.scheduler == "onecycle":
                sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, MAX_LR, total_steps=total)
            else:
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Project


Project = project_class(pl)


def project_trainer(
    ns: ModuleType,
    root: Path,
    surgeon: ScheduleSurgeon,
    *,
    patience: int = 3,
    check_on_train_epoch_end: bool | None = None,
    **kw: Any,
) -> Any:
    """The project's Trainer: LearningRateMonitor first, then the surgeon, ModelCheckpoint and
    EarlyStopping (``check_on_train_epoch_end``: where it checks, Lightning's choice by
    default); TensorBoard and CSV loggers; validation every epoch."""
    callbacks = [
        ns.callbacks.LearningRateMonitor(),
        surgeon,
        ns.callbacks.ModelCheckpoint(
            root / "ckpt",
            filename="e{epoch}-phase{surgeon/phase:.0f}",
            auto_insert_metric_name=False,
            save_top_k=-1,
        ),
        ns.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=patience,
            check_on_train_epoch_end=check_on_train_epoch_end,
        ),
    ]
    loggers = [
        ns.loggers.TensorBoardLogger(root, name="tb"),
        ns.loggers.CSVLogger(root, name="csv"),
    ]
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": root,
        "logger": loggers,
        "callbacks": callbacks,
        "log_every_n_steps": 5,
        "enable_model_summary": False,
        "max_epochs": 6,
        **kw,
    }
    return ns.Trainer(**kwargs)


def fit(trainer: Any, model: Any, ckpt_path: Path | None = None) -> None:
    trainer.fit(model, make_loader(BATCHES), make_loader(4, seed=1), ckpt_path=ckpt_path)


def csv_rows(trainer: Any) -> list[dict[str, str]]:
    csv_logger = next(lg for lg in trainer.loggers if type(lg).__name__ == "CSVLogger")
    with (Path(csv_logger.log_dir) / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key``, in file order."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def tensorboard(log_dir: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (path,) = Path(log_dir).glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


# ---------------------------------------------------------------------------- the whole project


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_a_typical_project_sees_what_the_surgeon_does(
    tmp_path: Path, info_lines: list[str], namespace: str
) -> None:
    ns = importlib.import_module(namespace)
    bar: list[str] = []

    class ReadBar(ns.Callback):  # what the progress bar shows after each step
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            bar.append(trainer.progress_bar_callback.get_metrics(trainer, pl_module)["phase"])

    cb = ScheduleSurgeon()
    model = project_class(ns)()
    trainer = project_trainer(ns, tmp_path, cb, max_epochs=4)
    trainer.callbacks.append(ReadBar())
    fit(trainer, model)
    events = cb.events
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.WARMUP_END and kinds[-1] is EventKind.DONE
    after = [r["lr"] for r in model.records][events[0].step + 1 :]
    assert after == sorted(after, reverse=True)  # the decay follows the warmup (no hold)

    # 4. the OneCycleLR was dropped, with a line naming it; its max_lr is the peak
    (dropped,) = [line for line in info_lines if "replacing the LR scheduler" in line]
    assert "OneCycleLR (of AdamW, peak LR 0.003)" in dropped
    assert trainer.lr_scheduler_configs == []
    assert max(r["lr"] for r in model.records) == pytest.approx(MAX_LR)

    # 1. every event on the console, in order, through Lightning's rank-zero info channel
    shown = [line for line in info_lines if line.startswith("ScheduleSurgeon: step ")]
    assert [line.split(": ")[2] for line in shown] == [e.kind.value for e in events]
    # 2. LearningRateMonitor was detected, said so, and the surgeon moved ahead of it
    assert any(
        "LearningRateMonitor logs the learning rates (lr-AdamW/all)" in x for x in info_lines
    )
    assert trainer.callbacks.index(cb) < next(
        i for i, c in enumerate(trainer.callbacks) if type(c).__name__ == "LearningRateMonitor"
    )

    rows = csv_rows(trainer)
    # one LR series (the monitor's: at Lightning's logging steps and each epoch start), one
    # value per step, the LR the step used
    lrs = series(rows, "lr-AdamW/all")
    steps = [s for s, _ in lrs]
    logging_steps = {s for s in range(4 * BATCHES) if (s + 1) % 5 == 0}
    assert len(steps) == len(set(steps)) and set(steps) == logging_steps | {0, 20, 40, 60}
    used = {r["step"]: r["lr"] for r in model.records}
    assert all(value == pytest.approx(used[s], rel=1e-6) for s, value in lrs)
    assert {s for s, _ in series(rows, "train_loss")} == logging_steps  # Lightning's own rows
    assert {s for s, _ in series(rows, "surgeon/lr_scale")} == logging_steps
    assert not [k for k in rows[0] if k.startswith("lr-") and k != "lr-AdamW/all"]
    # the surgeon's losses: at their own steps (Lightning's), in order
    loss_steps = [s for s, _ in series(rows, "surgeon/loss")]
    assert loss_steps == sorted(loss_steps) and set(loss_steps) == logging_steps
    # each event as surgeon/event (its code) in the CSV
    assert sorted(v for _, v in series(rows, "surgeon/event")) == sorted(
        EVENT_CODES[e.kind] for e in events
    )

    # 1. events.jsonl in each logger's directory: a plot of the root finds them
    csv_dir, tb_dir = (Path(lg.log_dir) for lg in reversed(trainer.loggers))
    assert cb.log_dirs == [tb_dir, csv_dir]
    for directory in (tb_dir, csv_dir):
        records = [json.loads(x) for x in (directory / "events.jsonl").read_text().splitlines()]
        assert [(r["step"], r["kind"]) for r in records] == [(e.step, e.kind.value) for e in events]
    metrics_file, events_file = find_run_files(tmp_path)
    assert events_file == metrics_file.parent / "events.jsonl"

    # TensorBoard: each event as text, the settings among the hyperparameters (with the model's)
    accumulator = tensorboard(trainer.loggers[0].log_dir)
    texts = accumulator.Tensors("surgeon/events/text_summary")
    assert len(texts) == len(events)
    assert events[0].reason in texts[0].tensor_proto.string_val[0].decode()
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert {"surgeon/decay", "surgeon/total_steps", "scheduler"} <= set(hparams)
    assert hparams["surgeon/total_steps"].number_value == 4 * BATCHES
    # CSV: hparams.yaml
    saved = yaml.safe_load((csv_dir / "hparams.yaml").read_text())
    assert saved["surgeon"]["decay"] == "wsd" and saved["surgeon"]["total_steps"] == 4 * BATCHES

    # 3. callback_metrics, the progress bar and the checkpoints' names
    metrics = trainer.callback_metrics
    assert metrics["surgeon/lr"].item() == pytest.approx(model.records[-1]["lr"], rel=1e-6)
    assert metrics["surgeon/phase"].item() == PHASE_CODES[Phase.DONE]
    assert metrics["surgeon/last_event"].item() == EVENT_CODES[EventKind.DONE]
    assert metrics["surgeon/last_event_step"].item() == events[-1].step
    # the bar: from the first step (after the sanity check), through the decay, to `done`
    assert [p for i, p in enumerate(bar) if i == 0 or bar[i - 1] != p] == [
        "warmup",
        "stable",  # the default holds the peak, then decays
        "decay",
        "done",
    ]
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    phases = {int(n.split("phase")[1].split(".")[0]) for n in names}
    assert len(names) == 4 and phases <= set(map(int, PHASE_CODES.values())) and len(phases) > 1


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_the_lr_series_shares_lightnings_steps_without_a_monitor(
    tmp_path: Path, tensor_lr: bool
) -> None:
    """Without LearningRateMonitor the surgeon logs ``lr-AdamW/all`` itself, named as the monitor
    names a single named group, at the steps Lightning logs ``train_loss`` (``(step + 1) % 5``).
    A tensor LR is driven in place (the optimizer keeps its tensor) and logged by value."""
    cb = ScheduleSurgeon()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path),
        callbacks=[cb],
        log_every_n_steps=5,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Project(scheduler=None, tensor_lr=tensor_lr)
    fit(trainer, model)
    assert isinstance(model.optimizers().param_groups[0]["lr"], Tensor) == tensor_lr
    rows = csv_rows(trainer)
    lrs = series(rows, "lr-AdamW/all")
    assert len({value for _, value in lrs}) > 2  # the LR moved
    assert [s for s, _ in lrs] == [s for s, _ in series(rows, "train_loss")]
    assert [s for s, _ in lrs] == [s for s in range(2 * BATCHES) if (s + 1) % 5 == 0]
    used = {r["step"]: r["lr"] for r in model.records}
    assert all(value == pytest.approx(used[s], rel=1e-6) for s, value in lrs)


def test_lr_names_follow_learning_rate_monitor() -> None:
    net = nn.Linear(2, 2)
    named = torch.optim.AdamW([{"params": net.parameters(), "name": "all"}])
    plain = torch.optim.AdamW(net.parameters())
    two = torch.optim.SGD([{"params": [net.weight]}, {"params": [net.bias], "name": "b"}], lr=1)
    assert lr_metric_names([named, plain, two]) == [
        ["lr-AdamW/all"],
        ["lr-AdamW-1"],
        ["lr-SGD/pg1", "lr-SGD/b"],
    ]


# ---------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize(
    ("scheduler", "peak", "tensor_lr"),
    [("onecycle", MAX_LR, False), ("cosine", LR, False), ("cosine", LR, True)],
)
def test_a_returned_scheduler_is_replaced_and_its_peak_kept(
    tmp_path: Path, info_lines: list[str], scheduler: str, peak: float, tensor_lr: bool
) -> None:
    """The scheduler is dropped (never stepped: the LR follows the surgeon's plan, not the
    1cycle or cosine curve); the peak is OneCycleLR's ``max_lr``, else the configured LR (a
    tensor LR's value)."""
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[cb],
        max_steps=40,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    model = Project(scheduler=scheduler, total_steps=40, tensor_lr=tensor_lr)
    trainer.fit(model, make_loader(BATCHES))
    name = {"onecycle": "OneCycleLR", "cosine": "CosineAnnealingLR"}[scheduler]
    assert any(f"{name} (of AdamW, peak LR {peak:.4g})" in line for line in info_lines)
    plan = Controller(40, cb.config)  # no loss can change a 40-step plan's shape here but cuts
    lrs = [r["lr"] for r in model.records]
    assert lrs[0] == pytest.approx(peak * plan.lr_scale(0))
    assert max(lrs) == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(peak * cb.controller.lr_scale(39))


def test_refusing_a_scheduler_is_a_lightning_misconfiguration(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[ScheduleSurgeon(replace_lr_schedulers=False)],
        max_steps=5,
        default_root_dir=tmp_path,
    )
    with pytest.raises(MisconfigurationException, match="OneCycleLR") as err:
        trainer.fit(Project(), make_loader())
    assert isinstance(err.value, ValueError)
    assert "replace_lr_schedulers=False" in str(err.value)
    assert "return only the optimizer(s)" in str(err.value)


class _Unsized(IterableDataset):
    """The batches of a loader as an iterable dataset without ``__len__``."""

    def __init__(self, loader: DataLoader) -> None:
        self.batches = list(loader)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_errors_before_training_are_misconfigurations_of_the_trainers_namespace(
    tmp_path: Path, namespace: str
) -> None:
    """No finite planned length, a warmup longer than the run: the Trainer's namespace's
    ``MisconfigurationException`` (and a ``ValueError``), naming the setting and the fix."""
    ns = importlib.import_module(namespace)
    misconfiguration = importlib.import_module(
        f"{namespace}.utilities.exceptions"
    ).MisconfigurationException
    model = project_class(ns)(scheduler=None)

    def trainer(**kw: Any) -> Any:
        return ns.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, **kw)

    with pytest.raises(misconfiguration, match=r"total_steps=\.\.\."):
        trainer(callbacks=[ScheduleSurgeon()], max_epochs=-1).fit(model, make_loader())
    unsized = DataLoader(_Unsized(make_loader()), batch_size=None)  # epochs of unknown length
    with pytest.raises(misconfiguration, match=r"max_epochs=2 cannot give one") as err:
        trainer(callbacks=[ScheduleSurgeon()], max_epochs=2).fit(model, unsized)
    assert "no length" in str(err.value) and "max_steps=..." in str(err.value)
    with pytest.raises(misconfiguration, match=r"warmup=50 steps, total_steps=20") as err:
        trainer(callbacks=[ScheduleSurgeon(warmup=50)], max_steps=20).fit(model, make_loader())
    assert "max_steps=20" in str(err.value) and isinstance(err.value, ValueError)
    model.hparams.lr_zero = True  # a refused LR: named, without the run length's story
    with pytest.raises(misconfiguration, match=r"param group 0 \('all'\) of AdamW lr must") as err:
        trainer(callbacks=[ScheduleSurgeon()], max_steps=20).fit(model, make_loader())
    assert "planned length" not in str(err.value)


# ---------------------------------------------------------------------------- budget


@pytest.mark.slow
def test_a_max_time_fit_ends_annealed(tmp_path: Path) -> None:
    """Only ``max_time`` bounds the fit: the run is planned from the step rate of its first steps
    (a ``replan``), cools down as the time runs out, and ends annealed: at the floor, or (the
    machine slowed down in the last seconds: a shared CI host) in the cooldown's last steps."""
    cb = ScheduleSurgeon(min_warmup=0.05, max_warmup=0.1)
    model = Project(scheduler=None)
    trainer = project_trainer(
        pl,
        tmp_path,
        cb,
        max_epochs=None,
        max_time={"seconds": 4},
        patience=1000,
        enable_progress_bar=False,
    )
    fit(trainer, model)
    kinds = [e.kind for e in cb.events]
    assert kinds[0] is EventKind.REPLAN and "max_time" in cb.events[0].reason
    assert EventKind.COOLDOWN in kinds
    lrs = [r["lr"] for r in model.records]
    assert len(lrs) > 50  # enough steps that the plan had room (~300 alone, 88 on a busy host)
    assert max(lrs) == pytest.approx(LR)
    if EventKind.STOPPED in kinds:  # the time ran out a few steps before the cooldown's end
        stopped = cb.events[-1]
        done, planned = map(int, re.findall(r"after (\d+) of the (\d+) planned", stopped.reason)[0])
        assert planned - done <= 0.02 * planned and lrs[-1] <= 0.1 * LR
    else:
        assert cb.phase is Phase.DONE
        assert lrs[-1] == pytest.approx(cb.config.min_lr_ratio * LR)


@pytest.mark.slow
def test_a_max_time_plan_under_ddp_is_rank_zeros_on_both_ranks(tmp_path: Path) -> None:
    """Two DDP processes (gloo) with only ``max_time``: each rank measures its own step rate,
    rank zero's estimates are broadcast, so both plan, cool down and end alike, and say so in
    the same words (the seconds left and the step rate each reason quotes are rank zero's)."""
    from test_ddp import run_worker

    ranks = run_worker(tmp_path, "--max-time=6", "--spike-step=-1", "--nan-step=-1")
    lrs = [[lr for _, lr in r["lrs"]] for r in ranks]
    assert lrs[0] == lrs[1] and len(lrs[0]) > 100
    assert ranks[0]["events"] == ranks[1]["events"]
    assert ranks[0]["reasons"] == ranks[1]["reasons"]  # rank zero's clock readings, on both
    kinds = [kind for _, kind in ranks[0]["events"]]
    assert kinds[0] == "replan" and "cooldown" in kinds
    if kinds[-1] == "done":
        assert lrs[0][-1] == pytest.approx(0.0)  # the worker's SGD(lr=0.05), at the floor 0
    else:  # the time ran out in the cooldown's last steps (a host that slowed at the end)
        assert kinds[-1] == "stopped" and lrs[0][-1] <= 0.1 * 0.05


@pytest.mark.parametrize("on_epoch_end", [None, False], ids=["epoch-end", "validation-end"])
def test_early_stopping_about_to_stop_the_fit_cools_down_to_the_floor_first(
    tmp_path: Path, on_epoch_end: bool | None
) -> None:
    """val_loss improves for 3 epochs, then stays flat: EarlyStopping(patience=3) stops the fit
    at the end of epoch 5. After epoch 4's check (2 of 3 without improvement) the surgeon
    decays to the floor over epoch 5; its last step runs at the floor. EarlyStopping checks at
    the train epoch's end (Lightning's default here) or at the validation's."""
    script = [3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # the peak holds till then (a 20% tail)
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, decay="wsd", wsd_decay_fraction=0.2)
    model = Project(scheduler=None, val_script=script)
    trainer = project_trainer(
        pl,
        tmp_path,
        cb,
        check_on_train_epoch_end=on_epoch_end,
        max_epochs=len(script),
        enable_progress_bar=False,
    )
    fit(trainer, model)
    assert trainer.current_epoch == 6 and len(model.records) == 6 * BATCHES  # stopped early
    (cooldown,) = [e for e in cb.events if e.kind is EventKind.COOLDOWN]
    assert "EarlyStopping(monitor='val_loss', patience=3) has seen 2 checks" in cooldown.reason
    assert cooldown.step == 5 * BATCHES - 1  # decided after epoch 4's check, from epoch 5 on
    lrs = [r["lr"] for r in model.records]
    floor = cb.config.min_lr_ratio * LR
    assert lrs[5 * BATCHES] == pytest.approx(LR)  # the peak still, then down ...
    epoch5 = lrs[5 * BATCHES :]
    assert epoch5 == sorted(epoch5, reverse=True)
    assert lrs[-1] == pytest.approx(floor)  # ... to the floor by the stopping check
    assert cb.phase is Phase.DONE and EventKind.STOPPED not in [e.kind for e in cb.events]


def test_early_stopping_callbacks_checking_in_different_places_are_noticed(
    tmp_path: Path, info_lines: list[str]
) -> None:
    """One EarlyStopping checks at the epoch's end, another at validations inside the epoch:
    the cooldown follows the epoch-end checks only, said once at the fit's start (a user trial
    saw a stop at a validation at LR scale 0.98, unsaid); one place alone says nothing."""
    for both in (False, True):
        cb = ScheduleSurgeon(min_warmup=4, max_warmup=8)
        trainer = project_trainer(
            pl,
            tmp_path / str(both),
            cb,
            check_on_train_epoch_end=True,
            max_epochs=2,
            enable_progress_bar=False,
        )
        if both:
            at_validations = pl.callbacks.EarlyStopping(
                monitor="val_loss", patience=3, check_on_train_epoch_end=False
            )
            trainer.callbacks.append(at_validations)
        info_lines.clear()
        fit(trainer, Project(scheduler=None, val_script=[3.0, 2.0]))
        said = [line for line in info_lines if "check in different places" in line]
        assert len(said) == both


def test_one_check_without_improvement_makes_no_cooldown(tmp_path: Path) -> None:
    """``patience=2``: one check without improvement (epoch 3) is one from a stop, but one noisy
    check says little (the next improves, epoch 4): no cooldown, the fit runs its plan (a user
    trial: a cooldown there ended 4 of 6 fits at a third of their epochs)."""
    script = [3.0, 2.0, 1.0, 1.5, 0.8, 0.7]
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, decay="wsd")
    model = Project(scheduler=None, val_script=script)
    trainer = project_trainer(
        pl, tmp_path, cb, patience=2, max_epochs=len(script), enable_progress_bar=False
    )
    fit(trainer, model)
    assert EventKind.COOLDOWN not in [e.kind for e in cb.events]
    assert len(model.records) == len(script) * BATCHES and cb.phase is Phase.DONE


@pytest.mark.parametrize("checkpoints", [True, False], ids=["checkpointed", "no-checkpoints"])
def test_a_cooldown_whose_check_improves_gives_the_fit_its_plan_back(
    tmp_path: Path, checkpoints: bool
) -> None:
    """The anneal for EarlyStopping's last check improves val_loss (epoch 5: 0.5), so that check
    does not stop the fit: the LR ramps back over an epoch to where the cooldown started and the
    plan runs on (before: the surgeon stopped the fit at LR 0, which ended fits EarlyStopping
    would have run on, a user trial). Two checks later without improvement it cools down again,
    and EarlyStopping's stop comes at the floor, after epoch 8 of 10."""
    script = [3.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, decay="wsd")
    model = Project(scheduler=None, val_script=script)
    trainer = project_trainer(pl, tmp_path, cb, max_epochs=len(script), enable_progress_bar=False)
    if not checkpoints:
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    fit(trainer, model)
    # (a `done` when the cooldown's last loss is read: at once where a checkpoint reads them)
    kinds = [e.kind for e in cb.events if e.kind in (EventKind.COOLDOWN, EventKind.REPLAN)]
    cooldown, replan = EventKind.COOLDOWN, EventKind.REPLAN
    assert kinds == [cooldown, replan, cooldown]
    (rewarm,) = [e for e in cb.events if e.kind is replan]
    assert rewarm.step == 6 * BATCHES - 1 and "its check improved" in rewarm.reason
    assert f"the plan ends at step {len(script) * BATCHES}" in rewarm.reason
    lrs = [r["lr"] for r in model.records]
    assert len(lrs) == 9 * BATCHES  # EarlyStopping stopped after epoch 8
    assert lrs[6 * BATCHES - 1] == 0.0  # the cooldown's end
    ramp = lrs[6 * BATCHES : 7 * BATCHES + 1]
    assert ramp == sorted(ramp) and ramp[0] < 0.1 * LR and ramp[-1] == pytest.approx(LR)
    assert lrs[-1] == 0.0  # the second cooldown's end, where the fit stopped


@pytest.mark.parametrize("early_stopping_first", [True, False])
def test_with_validation_inside_epochs_the_stop_at_lr_zero_comes_at_the_check(
    tmp_path: Path, early_stopping_first: bool
) -> None:
    """Two validations per epoch (``val_check_interval=0.5``): the anneal for EarlyStopping's
    last check improves it 10 steps before the fit's last, too few to ramp back up and decay
    again (two check intervals), so the surgeon stops the fit at LR 0. Listed after EarlyStopping it
    acts at that validation's end (its check is done): no step runs after it; listed before,
    at the next step's start, the first hook after the check: one step at LR 0 runs (and
    Lightning validates once more as the fit stops)."""
    script = [3.0, 2.5, 2.0, 1.0, 1.0, 1.0, 0.5] + [0.5] * 10  # one per validation: the 7th,
    # the one the anneal improves, is in the middle of an epoch

    class PerValidation(Project):  # type: ignore[misc, valid-type]
        def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            self.log("val_loss", torch.tensor(script[min(self.validations, len(script) - 1)]))

        def on_validation_epoch_end(self) -> None:
            self.validations += 1

    model = PerValidation(scheduler=None)
    model.validations = 0
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, decay="wsd")
    es = pl.callbacks.EarlyStopping(monitor="val_loss", patience=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[es, cb] if early_stopping_first else [cb, es],
        max_epochs=4,  # the improved check 10 steps from the end: too few to ramp back up
        val_check_interval=0.5,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    fit(trainer, model)
    assert [e.kind for e in cb.events][-3:] == [
        EventKind.COOLDOWN,
        EventKind.DONE,
        EventKind.STOPPED,
    ]
    half = BATCHES // 2
    # listed first, the surgeon stops the fit at the next step, which Lightning validates again
    assert model.validations == (7 if early_stopping_first else 8)
    assert len(model.records) == 7 * half + (0 if early_stopping_first else 1)
    assert model.records[-1]["lr"] == 0.0


def test_a_resumed_fit_knows_its_cooldown_was_for_early_stopping(tmp_path: Path) -> None:
    """Checkpointed inside the EarlyStopping cooldown and resumed: the resumed fit, too, gives
    the plan back when the anneal improves the check (the cooldown is in the checkpoint's
    events), with the events and LRs of the uninterrupted fit."""
    script = [3.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]

    def run(root: Path, ckpt_path: Path | None = None) -> tuple[ScheduleSurgeon, Any]:
        cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, decay="wsd")
        model = Project(scheduler=None, val_script=script)
        trainer = project_trainer(pl, root, cb, max_epochs=len(script), enable_progress_bar=False)
        trainer.callbacks.append(
            ModelCheckpoint(root / "mid", "{step}", every_n_train_steps=5 * BATCHES + 5)
        )
        fit(trainer, model, ckpt_path=ckpt_path)
        return cb, model

    whole, whole_model = run(tmp_path / "a")
    (mid,) = (tmp_path / "a" / "mid").glob("step=*.ckpt")
    resumed, model = run(tmp_path / "b", mid)
    kinds = [e.kind for e in whole.events]
    assert kinds.count(EventKind.COOLDOWN) == 2 and EventKind.REPLAN in kinds  # (see above)
    assert [(e.step, e.kind) for e in resumed.events] == [(e.step, e.kind) for e in whole.events]
    assert [r["lr"] for r in model.records] == [
        r["lr"] for r in whole_model.records if r["step"] >= 5 * BATCHES + 5
    ]


def test_a_checkpoint_of_the_check_before_the_last_resumes_into_the_same_cooldown(
    tmp_path: Path, info_lines: list[str]
) -> None:
    """``ModelCheckpoint`` saves right after the validation whose ``EarlyStopping`` check is one
    from stopping, before the surgeon has acted on it (it does at the next step): resumed from
    that checkpoint, the fit makes the same cooldown at the same step, with the same LRs."""
    script = [3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]

    def run(root: Path, ckpt_path: Path | None = None) -> tuple[ScheduleSurgeon, Any]:
        cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, decay="wsd", wsd_decay_fraction=0.2)
        model = Project(scheduler=None, val_script=script)
        trainer = project_trainer(pl, root, cb, max_epochs=len(script), enable_progress_bar=False)
        fit(trainer, model, ckpt_path=ckpt_path)
        return cb, model

    whole, whole_model = run(tmp_path / "a")
    (cooldown,) = [e for e in whole.events if e.kind is EventKind.COOLDOWN]
    (at_check,) = (tmp_path / "a" / "ckpt").glob("e4-*.ckpt")  # after epoch 4's check
    resumed, model = run(tmp_path / "b", at_check)
    assert [e for e in resumed.events if e.kind is EventKind.COOLDOWN] == [cooldown]
    said = [line for line in info_lines if "resumed at step" in line]  # a resume says so
    assert said == [
        f"ScheduleSurgeon: resumed at step {5 * BATCHES} with the checkpoint's state: phase "
        "stable, LR scale 1, 1 event so far, the plan ends at step "
        f"{len(script) * BATCHES}"
    ]
    assert [r["lr"] for r in model.records] == [r["lr"] for r in whole_model.records][-BATCHES:]


def test_a_fit_that_ends_before_its_plan_says_so(tmp_path: Path, info_lines: list[str]) -> None:
    """EarlyStopping with patience=1 gives no warning to cool down on: the fit stops at the
    peak, and a ``stopped`` event says how far the plan got and why."""
    script = [3.0, 2.0, 2.0]
    cb = ScheduleSurgeon(min_warmup=4, max_warmup=8, decay="wsd")
    trainer = project_trainer(pl, tmp_path, cb, patience=1, max_epochs=6, enable_progress_bar=False)
    fit(trainer, Project(scheduler=None, val_script=script))
    stopped = cb.events[-1]
    assert stopped.kind is EventKind.STOPPED and stopped.step == 3 * BATCHES - 1
    assert f"after {3 * BATCHES} of the {6 * BATCHES} planned steps, in phase stable" in (
        stopped.reason
    )
    assert "EarlyStopping(monitor='val_loss') stopped it: Monitored metric val_loss" in (
        stopped.reason
    )
    assert any(
        line.startswith(f"ScheduleSurgeon: step {stopped.step}: stopped:") for line in info_lines
    )
    record = json.loads((cb.log_dirs[0] / "events.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "stopped"


def test_cool_down_now_decays_to_the_floor_over_the_requested_steps(tmp_path: Path) -> None:
    at, steps = 30, 20

    class Request(pl.Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == at:
                self.event = cb.cool_down_now(steps)

    cb, request = ScheduleSurgeon(min_warmup=4, max_warmup=8, decay="wsd"), Request()
    model = Project(scheduler=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[request, cb],
        max_steps=100,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, make_loader(BATCHES))
    assert request.event.kind is EventKind.COOLDOWN and request.event.step == at - 1
    assert "cool_down_now(steps=20) was called" in request.event.reason
    lrs = [r["lr"] for r in model.records]
    assert lrs[at] == pytest.approx(LR)  # the LR goes on from where it was ...
    assert lrs[at : at + steps + 1] == sorted(lrs[at : at + steps + 1], reverse=True)
    floor = cb.config.min_lr_ratio * LR
    assert lrs[at + steps] == pytest.approx(floor) == lrs[-1]  # ... to the floor, and stays
    assert cb.controller.total_steps == at + steps and cb.phase is Phase.DONE
    assert cb.cool_down_now() is None  # the plan is over: nothing to bring forward


# ---------------------------------------------------------------------------- LightningCLI


def test_every_argument_is_documented_for_lightning_cli_help() -> None:
    """``LightningCLI --help`` (jsonargparse) shows each argument's Google-style ``Args:`` text."""
    from jsonargparse import ArgumentParser

    params = [p for p in inspect.signature(ScheduleSurgeon.__init__).parameters if p != "self"]
    documented = {
        p.arg_name: p.description for p in docstring_parser.parse(ScheduleSurgeon.__doc__).params
    }
    assert set(documented) == set(params)
    parser = ArgumentParser()
    parser.add_class_arguments(ScheduleSurgeon, "surgeon")
    text = " ".join(parser.format_help().split())
    for name in params:
        first_words = " ".join(documented[name].split()[:4])
        assert f"--surgeon.{name}" in text and first_words in text, name
