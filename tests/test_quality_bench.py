"""The outcome benchmark (``benchmarks/quality*.py``): its scoring on scripted inputs, its
contenders' LR shapes, the recorded protocol of its tasks, and short real runs through ``main``.

The scoring tests feed hand-made run records (a final validation loss per task, contender and
seed) to ``summarize`` and ``targets``: the oracle, the ratios, the geometric mean, the keep
rule and the targets must come out as the protocol says. The fit tests run a few contenders for
a few dozen steps in-process: the LR each contender drives, ``ReduceLROnPlateau``'s wiring, a
NaN run counted as diverged, ``--surgeon`` variants, ``--reuse``. The slow test runs
``--quick`` itself, as CI does, in a subprocess.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402
import quality_contenders as qc  # noqa: E402
import quality_score as qs  # noqa: E402
import quality_tasks  # noqa: E402

TASKS = quality_tasks.TASKS

# ---------------------------------------------------------------------------- scoring


def run_record(
    task: str, contender: str, seed: int, final: float, *, rising: bool = False, steps: int = 100
) -> dict[str, Any]:
    """A fit's raw record with a final validation loss and a falling (or rising) training loss."""
    slope = 0.01 if rising else -0.005
    return {
        "task": task,
        "contender": contender,
        "seed": seed,
        "steps": steps,
        "peak_lr": 1e-3,
        "train_loss": [1.0 + slope * i for i in range(steps)],
        "lr": [1e-3] * steps,
        "val": [(steps // 2, final + 0.1), (steps, final)],
        "events": [],
        "wall_s": 0.1,
        "key": "",
    }


def records(task: str, finals: dict[str, list[float]], **kwargs: Any) -> list[dict[str, Any]]:
    return [
        run_record(task, name, seed, value, **kwargs)
        for name, values in finals.items()
        for seed, value in enumerate(values)
    ]


BASE = dataclasses.replace(TASKS["mlp"], name="base", sweep=())
SCRIPTED_TASKS = {
    "base": BASE,
    "other": dataclasses.replace(BASE, name="other"),
    "flat": dataclasses.replace(BASE, name="flat"),
    "base_3x": quality_tasks.at_lr_factor(BASE, 3),
}
CONTENDERS = qc.CONTENDERS | {"alt": qc.parse_surgeon("alt:decay=linear")}


def scripted() -> list[dict[str, Any]]:
    """``base``: the oracle is w5_linear (0.80), constant 1.00 (gap 20%, kept); the surgeon is
    0.76 (0.95x), alt 0.84 (1.05x). ``other``: oracle w10_wsd 0.50, constant 0.60, surgeon 0.50
    (1.00x), alt 0.45 (0.90x). ``flat``: oracle 0.99 vs constant 1.00 (gap 1%, dropped), surgeon
    2.00. ``base_3x``: the surgeon 0.84 (1.05x base's oracle) with seed 1 diverged, alt 0.96."""
    runs = records(
        "base",
        {
            "w0_cosine": [0.90, 0.90],
            "w5_linear": [0.78, 0.82],
            "w20_wsd": [0.85, 0.85],
            "constant": [1.00, 1.00],
            "surgeon": [0.76, 0.76],
            "alt": [0.84, 0.84],
        },
    )
    runs += records(
        "other",
        {
            "w0_cosine": [0.55, 0.55],
            "w10_wsd": [0.50, 0.50],
            "constant": [0.60, 0.60],
            "surgeon": [0.50, 0.50],
            "alt": [0.45, 0.45],
        },
    )
    runs += records(
        "flat", {"w0_cosine": [0.99, 0.99], "constant": [1.0, 1.0], "surgeon": [2.0, 2.0]}
    )
    runs += records("base_3x", {"constant": [3.0, 3.0], "alt": [0.96, 0.96]})
    runs += [run_record("base_3x", "surgeon", 0, 0.84)]
    runs += [run_record("base_3x", "surgeon", 1, 0.84, rising=True)]
    return runs


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    return qs.summarize(scripted(), SCRIPTED_TASKS, CONTENDERS)


def test_the_oracle_is_the_best_grid_member_not_the_best_contender(summary: dict) -> None:
    base = summary["base"]
    assert base["oracle"] == "w5_linear"  # the surgeon (0.76) is better, but not in the grid
    assert base["contenders"]["w5_linear"]["score"] == pytest.approx(0.80)
    assert base["contenders"]["w5_linear"]["std"] == pytest.approx(math.sqrt(2) * 0.02)
    assert summary["other"]["oracle"] == "w10_wsd"
    assert qs.oracle_of({"a": 1.0, "b": 0.5, "c": 0.5}, ["a", "b", "c"]) == "b"  # first on a tie
    assert qs.oracle_of({"a": 1.0, "z": 0.1}, ["a"]) == "a"
    assert qs.oracle_of({"z": 0.1}, ["a"]) is None


def test_ratios_are_to_the_oracle_and_off_lr_tasks_to_the_tuned_oracle(summary: dict) -> None:
    base = summary["base"]["contenders"]
    assert base["surgeon"]["ratio"] == pytest.approx(0.95)
    assert base["alt"]["ratio"] == pytest.approx(1.05)
    assert base["constant"]["ratio"] == pytest.approx(1.25)
    hot = summary["base_3x"]
    assert hot["oracle"] is None and hot["reference"]["task"] == "base"
    assert hot["reference"]["contender"] == "w5_linear"
    assert hot["contenders"]["alt"]["ratio"] == pytest.approx(1.2)
    assert hot["contenders"]["surgeon"]["ratio"] == pytest.approx(1.05)
    assert hot["contenders"]["surgeon"]["diverged_seeds"] == [1]
    assert hot["kept"] is True and hot["constant_gap"] == pytest.approx(0.2)


def test_keep_rule_drops_a_task_where_the_oracle_barely_beats_constant(summary: dict) -> None:
    assert summary["base"]["kept"] is True
    assert summary["flat"]["constant_gap"] == pytest.approx(0.01)
    assert summary["flat"]["kept"] is False
    assert qs.kept(qs.constant_gap(0.97, 1.0)) and not qs.kept(qs.constant_gap(0.971, 1.0))
    assert qs.constant_gap(0.5, math.inf) == 1.0  # constant diverged: a scheduling task
    assert not qs.kept(qs.constant_gap(math.inf, 1.0))


def test_geometric_mean_is_over_kept_tasks_at_their_tuned_lr(summary: dict) -> None:
    means = qs.geomeans(summary)
    # base and other; not flat (dropped, surgeon 2.0x), not base_3x (off the tuned LR)
    # no seed noise in the winners (base: w5_linear on both held-out seeds): held out the same
    assert means["surgeon"] == {
        "geomean": pytest.approx(math.sqrt(0.95 * 1.0)),
        "heldout": pytest.approx(math.sqrt(0.95 * 1.0)),
        "tasks": 2,
    }
    assert means["alt"]["geomean"] == pytest.approx(math.sqrt(1.05 * 0.9))
    assert qs.geometric_mean([0.5, 2.0]) == pytest.approx(1.0)
    assert qs.geometric_mean([1.0, math.inf]) == math.inf
    assert math.isnan(qs.geometric_mean([])) and math.isnan(qs.geometric_mean([1.0, math.nan]))
    assert math.isnan(qs.ratio(1.0, math.inf)) and qs.ratio(math.inf, 2.0) == math.inf


def test_targets_met_or_missed_per_surgeon(summary: dict) -> None:
    rows = {
        row["target"].split(":")[0].split(" ")[0]: row["results"] for row in qs.targets(summary)
    }
    every, geomean, off, plateau = (rows[k] for k in ("<=", "geometric", "3x", "plateau"))
    assert every["surgeon"]["met"] is True  # 0.95 and 1.00; flat (2.0x) is dropped
    assert every["alt"]["met"] is False and "base 1.05x" in every["alt"]["detail"]
    assert geomean["surgeon"]["met"] is True  # sqrt(0.95 x 1.00) = 0.975
    assert geomean["alt"]["met"] is True  # sqrt(1.05 x 0.90) = 0.972: over on one task only
    assert off["surgeon"]["met"] is False and "1/2 diverged" in off["surgeon"]["detail"]
    assert off["alt"]["met"] is False and "1.2x" in off["alt"]["detail"]  # over 1.10x
    assert plateau["surgeon"]["met"] is None  # no parity task here


@pytest.mark.parametrize(("alt_other", "met"), [(0.45, True), (0.46, False)], ids=["under", "over"])
def test_geometric_mean_target_threshold(alt_other: float, met: bool) -> None:
    runs = [r for r in scripted() if not (r["task"] == "other" and r["contender"] == "alt")]
    runs += records("other", {"alt": [alt_other, alt_other]})
    summary = qs.summarize(runs, SCRIPTED_TASKS, CONTENDERS)
    value = math.sqrt(1.05 * alt_other / 0.5)
    assert qs.geomeans(summary)["alt"]["geomean"] == pytest.approx(value)
    row = next(r for r in qs.targets(summary) if r["target"].startswith("geometric"))
    assert row["results"]["alt"]["met"] is met


def test_plateau_target_needs_both_constant_and_cosine_beaten() -> None:
    tasks = {"parity": dataclasses.replace(BASE, name="parity")}
    runs = records("parity", {"w0_cosine": [0.5], "constant": [0.3], "surgeon": [0.2]})
    runs += records("parity", {"alt": [0.4]})
    summary = qs.summarize(runs, tasks, CONTENDERS)
    row = next(r for r in qs.targets(summary) if r["target"].startswith("plateau"))
    assert row["results"]["surgeon"]["met"] is True
    assert row["results"]["alt"]["met"] is False  # beats cosine, not constant


def test_a_diverged_seed_makes_the_score_infinite() -> None:
    assert qs.score([0.5, math.nan]) == math.inf and qs.score([0.5, 0.7]) == pytest.approx(0.6)
    runs = records("base", {"w0_cosine": [0.5, 0.5], "constant": [0.6, math.inf]})
    summary = qs.summarize(runs, {"base": BASE}, CONTENDERS)
    constant = summary["base"]["contenders"]["constant"]
    assert constant["score"] == math.inf and constant["finite"] == 1
    assert constant["diverged_seeds"] == [1] and summary["base"]["kept"] is True


# ---------------------------------------------------------------------------- context


def test_held_out_oracle_does_not_credit_a_schedule_for_one_lucky_seed() -> None:
    """w5_linear wins in-sample (mean 0.8667) by seed 0 alone; w0_cosine is 0.90 on every seed.
    Held out: seed 0 is scored by w0_cosine (chosen on seeds 1, 2), seeds 1 and 2 by w5_linear
    (chosen with seed 0's luck) at 1.00: the held-out oracle is 0.9667, and the steady surgeon
    at 0.90, over the oracle in-sample (1.038x), is under it held out (0.931x)."""
    runs = records(
        "base",
        {
            "w5_linear": [0.60, 1.00, 1.00],
            "w0_cosine": [0.90, 0.90, 0.90],
            "constant": [1.20, 1.20, 1.20],
            "surgeon": [0.90, 0.90, 0.90],
        },
    )
    task = qs.summarize(runs, {"base": BASE}, CONTENDERS)["base"]
    assert task["oracle"] == "w5_linear"
    picks = task["heldout"]["picks"]
    assert [(p["seed"], p["contender"]) for p in picks] == [
        (0, "w0_cosine"),
        (1, "w5_linear"),
        (2, "w5_linear"),
    ]
    assert [p["final_val_loss"] for p in picks] == pytest.approx([0.90, 1.00, 1.00])
    assert task["heldout"]["score"] == pytest.approx(2.9 / 3)
    assert task["heldout"]["ratio"] == pytest.approx(2.9 / 3 / (2.6 / 3))
    surgeon = task["contenders"]["surgeon"]
    assert surgeon["ratio"] == pytest.approx(0.90 / (2.6 / 3))
    assert surgeon["heldout_ratio"] == pytest.approx(0.90 / (2.9 / 3))


def test_held_out_oracle_equals_the_oracle_without_seed_noise(summary: dict) -> None:
    """``other``: every seed alike, w10_wsd best on each: the same pick every time, no bias."""
    other = summary["other"]
    assert [p["contender"] for p in other["heldout"]["picks"]] == ["w10_wsd", "w10_wsd"]
    assert other["heldout"]["ratio"] == pytest.approx(1.0)
    for entry in other["contenders"].values():
        assert entry["heldout_ratio"] == pytest.approx(entry["ratio"])
    # base_3x is scored against base's held-out oracle (w0_cosine 0.90 on seed 0, w5_linear
    # 0.82 on seed 1: chosen on seed 0, where w5_linear is 0.78 and w0_cosine 0.90)
    assert [p["contender"] for p in summary["base"]["heldout"]["picks"]] == [
        "w5_linear",
        "w5_linear",
    ]
    assert summary["base"]["heldout"]["score"] == pytest.approx(0.80)
    assert summary["base_3x"]["heldout"] is None
    assert summary["base_3x"]["contenders"]["alt"]["heldout_ratio"] == pytest.approx(1.2)


def test_held_out_oracle_with_a_non_finite_seed_and_with_one_seed() -> None:
    """w5_linear is best on seeds 0 and 1 and NaN on seed 2: chosen on seeds 0 and 1 (its score
    over them is finite), it makes seed 2's held-out loss, and so the held-out oracle's score,
    infinite (``score``'s rule): infinite times the oracle, and every ratio to it NaN. One seed:
    no held-out oracle."""
    runs = records(
        "base",
        {"w5_linear": [0.5, 0.5, math.nan], "w0_cosine": [0.9] * 3, "surgeon": [0.8] * 3},
    )
    task = qs.summarize(runs, {"base": BASE}, CONTENDERS)["base"]
    assert task["oracle"] == "w0_cosine"  # w5_linear's in-sample score is infinite
    assert [p["contender"] for p in task["heldout"]["picks"]] == ["w0_cosine"] * 2 + ["w5_linear"]
    assert task["heldout"]["score"] == math.inf
    assert task["heldout"]["ratio"] == math.inf
    assert math.isnan(task["contenders"]["surgeon"]["heldout_ratio"])
    one = [r for r in runs if r["seed"] == 0]
    task = qs.summarize(one, {"base": BASE}, CONTENDERS)["base"]
    assert task["heldout"] is None and math.isnan(task["contenders"]["surgeon"]["heldout_ratio"])
    assert math.isnan(task["contenders"]["surgeon"]["ratio_se"])


def test_ratio_standard_error_is_over_the_per_seed_paired_ratios() -> None:
    # paired ratios 1.1 and 1.3: stdev 0.1414 over sqrt(2)
    assert qs.ratio_se({0: 1.1, 1: 1.3}, {0: 1.0, 1: 1.0}) == pytest.approx(0.1)
    assert qs.ratio_se({0: 2.0, 1: 2.0}, {0: 1.0, 1: 2.0}) == pytest.approx(0.5)  # 2.0 and 1.0
    assert qs.ratio_se({0: 1.1, 1: 1.3, 2: 9.0}, {0: 1.0, 1: 1.0}) == pytest.approx(0.1)
    assert math.isnan(qs.ratio_se({0: 1.1}, {0: 1.0}))
    assert math.isnan(qs.ratio_se({0: 1.1, 1: math.nan}, {0: 1.0, 1: 1.0}))
    # in the summary: paired with the oracle's seeds (w5_linear 0.78, 0.82; the surgeon 0.76)
    runs = scripted()
    entry = qs.summarize(runs, SCRIPTED_TASKS, CONTENDERS)["base"]["contenders"]["surgeon"]
    expected = abs(0.76 / 0.78 - 0.76 / 0.82) / 2  # the stdev of two values over sqrt(2)
    assert entry["ratio_se"] == pytest.approx(expected)


def fixed_recipes() -> list[dict[str, Any]]:
    """Two kept tasks, 2 identical seeds. ``a``: w5_linear 1.00 (oracle), w10_linear 1.01,
    w20_wsd 1.03, w0_cosine 1.10; ``b``: w20_wsd 1.00 (oracle), w10_linear 1.01, w0_cosine 1.02,
    w5_linear 1.10; w1_cosine (1.005) only on ``a``; ``flat`` (dropped): w10_linear 5.0. The
    surgeon 1.02 on ``a``, 1.04 on ``b``."""
    runs = records(
        "a",
        {
            "w5_linear": [1.00] * 2,
            "w10_linear": [1.01] * 2,
            "w20_wsd": [1.03] * 2,
            "w0_cosine": [1.10] * 2,
            "w1_cosine": [1.005] * 2,
            "constant": [2.0] * 2,
            "surgeon": [1.02] * 2,
        },
    )
    runs += records(
        "b",
        {
            "w20_wsd": [1.00] * 2,
            "w10_linear": [1.01] * 2,
            "w0_cosine": [1.02] * 2,
            "w5_linear": [1.10] * 2,
            "constant": [2.0] * 2,
            "surgeon": [1.04] * 2,
        },
    )
    runs += records(
        "flat", {"w0_cosine": [0.99] * 2, "w10_linear": [5.0] * 2, "constant": [1.0] * 2}
    )
    return runs


RECIPE_TASKS = {n: dataclasses.replace(BASE, name=n) for n in ("a", "b", "flat")}


def test_best_single_fixed_recipe_is_the_lowest_geometric_mean_on_every_kept_task() -> None:
    """w10_linear is the oracle nowhere but 1.01x on both kept tasks: it beats w20_wsd
    (sqrt(1.03)), w5_linear (sqrt(1.10)) and w0_cosine (sqrt(1.10 x 1.02)); its 5.0 on the
    dropped task does not count, and w1_cosine (1.005x) ran on one kept task only."""
    summary = qs.summarize(fixed_recipes(), RECIPE_TASKS, CONTENDERS)
    assert summary["flat"]["kept"] is False
    best = qs.best_fixed(summary)
    assert best is not None
    assert (best["contender"], best["label"], best["tasks"]) == (
        "w10_linear",
        qc.CONTENDERS["w10_linear"].label,
        2,
    )
    assert best["geomean"] == pytest.approx(1.01)
    assert best["heldout"] == pytest.approx(1.01)  # no seed noise: held out = in-sample
    assert math.isnan(qs.geomeans(summary, ["w1_cosine"])["w1_cosine"]["geomean"])
    no_grid = [r for r in fixed_recipes() if not r["contender"].startswith("w")]
    assert qs.best_fixed(qs.summarize(no_grid, RECIPE_TASKS, CONTENDERS)) is None


def test_context_rows_sit_beside_the_targets_and_judge_nothing() -> None:
    summary = qs.summarize(fixed_recipes(), RECIPE_TASKS, CONTENDERS)
    ctx = qs.context(summary)
    assert ctx["best_fixed"]["contender"] == "w10_linear"
    assert ctx["heldout_oracle"] == {"geomean": pytest.approx(1.0), "tasks": 2}
    rows = {r["target"].split(": ")[1].split(" ")[0]: r["results"]["surgeon"] for r in ctx["rows"]}
    assert all(r["target"].startswith("context, not a target") for r in ctx["rows"])
    assert all(result["met"] is None for result in rows.values())
    # surgeon: 1.02x on a, 1.04x on b; geometric mean sqrt(1.02 x 1.04) = 1.03
    assert rows["ratio"]["detail"] == "geometric mean 1.03x; worst b 1.04x"
    assert rows["geometric"]["detail"] == "1.03x vs 1.01x; held out 1.03x vs 1.01x"
    # identical seeds: a standard error of 0, both ratios over 1.00x by more than 2 of them
    assert rows["ratios"]["detail"].startswith("more than 2 standard errors over: a 1.02 ± 0, b")
    assert rows["ratios"]["detail"].endswith("less (noise): none")
    # the targets are the four, as before
    assert len(qs.targets(summary)) == 4
    one = [r for r in fixed_recipes() if r["seed"] == 0]
    ctx = qs.context(qs.summarize(one, RECIPE_TASKS, CONTENDERS))
    details = [r["results"]["surgeon"]["detail"] for r in ctx["rows"]]
    assert details[0].startswith("n/a") and details[2].startswith("n/a")
    assert math.isnan(ctx["heldout_oracle"]["geomean"])


def test_a_noisy_ratio_over_one_is_told_apart_from_a_clear_one() -> None:
    """conv-like: the surgeon's seeds 0.023 and 0.045 against the oracle's 0.030 and 0.030
    (paired ratios 0.77 and 1.5: 1.13x ± 0.37, noise); on b 1.04 ± 0 (clear)."""
    runs = [r for r in fixed_recipes() if not (r["task"] == "a" and r["contender"] == "surgeon")]
    runs = [r for r in runs if not (r["task"] == "a" and r["contender"] == "w5_linear")]
    runs += records("a", {"w5_linear": [0.030, 0.030], "surgeon": [0.023, 0.045]})
    summary = qs.summarize(runs, RECIPE_TASKS, CONTENDERS)
    entry = summary["a"]["contenders"]["surgeon"]
    assert entry["ratio"] == pytest.approx(0.034 / 0.030)
    assert entry["ratio_se"] == pytest.approx((0.045 - 0.023) / 0.030 / 2)
    row = qs.context(summary)["rows"][-1]["results"]["surgeon"]["detail"]
    assert row == "more than 2 standard errors over: b 1.04 ± 0; less (noise): a 1.133 ± 0.37"


def test_diverged_definition() -> None:
    falling = [1.0 - 0.01 * i for i in range(100)]
    assert not qs.diverged(falling, 0.5)
    assert qs.diverged(falling, math.nan)  # final validation loss not finite
    assert qs.diverged([*falling[:50], math.inf, *falling[51:]], 0.5)
    rising = [1.0 + 0.01 * i for i in range(100)]
    assert qs.diverged(rising, 0.5)  # ends above where it started
    stalled = [0.70] * 10 + [0.693] * 90  # parity's plateau: not a divergence
    assert not qs.diverged(stalled, 0.693)


def test_lr_grid_and_sweep_choice() -> None:
    assert qs.lr_grid(1e-3, 1) == [3e-4, 1e-3, 3e-3]
    assert qs.lr_grid(0.1) == [0.01, 0.03, 0.1, 0.3, 1.0]
    assert qs.lr_grid(3.0, 1) == [1.0, 3.0, 10.0]
    with pytest.raises(ValueError, match=r"lr=0\.002"):
        qs.lr_grid(2e-3)
    runs = [
        {**run_record("base", "w5_cosine", seed, loss), "peak_lr": lr}
        for lr, losses in ((1e-3, [0.5, 0.7]), (3e-3, [0.4, 0.6]), (1e-2, [0.9, 0.9]))
        for seed, loss in enumerate(losses)
    ]
    sweep = qs.sweep_summary(runs, {"base": BASE})["base"]
    assert sweep["choice"] == 3e-3 and not sweep["edge"]
    assert [p["score"] for p in sweep["points"]] == pytest.approx([0.6, 0.5, 0.9])
    edge = qs.sweep_summary([r for r in runs if r["peak_lr"] != 1e-3], {"base": BASE})["base"]
    assert edge["choice"] == 3e-3 and edge["edge"]


# ---------------------------------------------------------------------------- the tasks


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.base is None])
def test_each_task_lr_is_its_sweeps_choice_inside_the_range(name: str) -> None:
    """The protocol: the recorded LR is the swept x3-grid LR with the lowest mean loss, not
    at either end of the range."""
    task = TASKS[name]
    lrs = [lr for lr, _ in task.sweep]
    assert len(lrs) >= 3 and lrs == qs.lr_grid(lrs[0], len(lrs) - 1)[len(lrs) - 1 :], lrs
    best = min(task.sweep, key=lambda point: point[1])[0]
    assert task.lr == best and best not in (lrs[0], lrs[-1])


def test_off_lr_tasks_are_the_lm_at_3x_and_10x_its_tuned_lr() -> None:
    assert {n: (t.base, t.lr_factor) for n, t in TASKS.items() if t.base} == {
        "char_3x": ("char", 3),
        "char_10x": ("char", 10),
    }
    for name in ("char_3x", "char_10x"):
        assert TASKS[name].lr == pytest.approx(TASKS["char"].lr * TASKS[name].lr_factor)
        assert TASKS[name].build is TASKS["char"].build
    assert len([t for t in TASKS.values() if t.base is None]) >= 7


@pytest.mark.parametrize(
    "module",
    [quality_tasks.BenchSupervised, quality_tasks.BenchCharLM, quality_tasks.BenchCircleNet],
)
def test_every_task_module_runs_the_mixins_hooks(module: type) -> None:
    """A task module's own ``training_step`` (say) placed before the mixin in the MRO would
    silently drop ``train_loss_window``, and ReduceLROnPlateau would fail mid-benchmark."""
    for hook in (
        "configure_optimizers",
        "training_step",
        "on_train_batch_end",
        "on_train_start",
        "on_validation_epoch_start",
        "on_validation_epoch_end",
    ):
        assert getattr(module, hook) is getattr(quality_tasks.BenchMixin, hook), hook


def test_char_batches_are_windows_and_their_next_characters() -> None:
    codes = torch.arange(100)
    batches = quality_tasks.CharBatches(codes, context=8, batch_size=4, batches=3, seed=0)
    inputs, targets = batches[2]
    assert inputs.shape == targets.shape == (4, 8) and len(batches) == 3
    assert torch.equal(targets, inputs + 1)  # codes are consecutive: the next character
    assert torch.equal(inputs[:, 0], batches.starts[2])


# ---------------------------------------------------------------------------- contenders


def test_the_oracle_grid_is_six_warmups_by_three_decays() -> None:
    names = [c.name for c in qc.GRID]
    assert len(names) == len(set(names)) == 18
    assert qc.COSINE in names and qc.SWEEP in names
    steps, peak = 100, 0.5
    for c in qc.GRID:
        lrs = [c.shape(peak, steps)(t) for t in range(steps + 1)]
        ramp = round(c.warmup * steps)
        assert lrs[ramp] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
        assert lrs[0] == (peak if ramp == 0 else 0.0)
        assert lrs[steps] == pytest.approx(0.0, abs=1e-12)
        if c.decay == "wsd":  # holds the peak until the last 20%
            assert lrs[80] == pytest.approx(peak) and lrs[90] == pytest.approx(peak / 2)
        if c.decay == "linear":
            mid = (ramp + steps) // 2
            assert lrs[mid] == pytest.approx(peak * (steps - mid) / (steps - ramp))
        if c.decay == "cosine":
            mid = (ramp + steps) // 2
            assert lrs[mid] == pytest.approx(peak / 2, rel=0.05)


def test_surgeon_variants_from_the_command_line() -> None:
    c = qc.parse_surgeon("fast:min_warmup=0.01,max_warmup=50,decay=cosine,plateau_action=restart")
    assert c.kind == "surgeon" and c.name == "fast"
    kwargs = dict(c.surgeon)
    assert kwargs == {
        "min_warmup": 0.01,
        "max_warmup": 50,
        "decay": "cosine",
        "plateau_action": "restart",
    }
    assert isinstance(kwargs["max_warmup"], int)  # steps, not a fraction
    assert dict(qc.parse_surgeon("plain").surgeon) == {}
    with pytest.raises(ValueError, match="taken"):
        qc.parse_surgeon("surgeon:decay=linear")
    with pytest.raises(ValueError, match="NAME"):
        qc.parse_surgeon("9x:decay=linear")
    with pytest.raises(ValueError, match="not key=value"):
        qc.parse_surgeon("x:decay")
    with pytest.raises(ValueError, match="no_such_knob"):
        qc.parse_surgeon("x:no_such_knob=1")
    with pytest.raises(ValueError, match="spike_factor"):  # the surgeon's own check
        qc.parse_surgeon("x:spike_factor=0")


def test_the_probe_tasks_run_apart(tmp_path: Path) -> None:
    """``--probes`` runs the probe tasks (added after the defaults were chosen) and only them,
    so their geometric mean is their own; a default run leaves them out; each trains."""
    probes = [name for name, task in TASKS.items() if task.probe]
    assert probes == ["autoenc", "gru", "logreg", "bn"]
    argv = ["--probes", "--quick", "--contenders", "constant,surgeon", "--steps", "20"]
    result = quality.main([*argv, "--seeds", "1", "--workers", "1", "--out", str(tmp_path)])
    assert list(result["summary"]) == probes
    for name in probes:
        finals = [e["score"] for e in result["summary"][name]["contenders"].values()]
        assert all(math.isfinite(x) for x in finals), name
    main = quality.task_selection(TASKS, None, probes=False)
    assert main[:7] == ["char", "finetune", "mlp", "conv", "regression", "parity", "circle"]
    assert not set(main) & set(probes) and set(main) | set(probes) == set(TASKS)
    assert quality.task_selection(TASKS, "gru,mlp", probes=False) == ["gru", "mlp"]


# ---------------------------------------------------------------------------- real fits

SLICE = ["w0_cosine", "w10_linear", "w20_wsd", "constant", "plateau", "schedule_free", "surgeon"]
"""In table order (``quality_contenders.CONTENDERS``)."""


@pytest.fixture(scope="module")
def sliced(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """mlp (AdamW), circle (SGD) and mlp at 3x its LR, 7 contenders and a variant, 40 steps,
    2 seeds."""
    out = tmp_path_factory.mktemp("quality")
    tasks = {
        "mlp": TASKS["mlp"],
        "circle": TASKS["circle"],
        "mlp_3x": quality_tasks.at_lr_factor(TASKS["mlp"], 3),
    }
    argv = ["--quick", "--contenders", ",".join(SLICE), "--surgeon", "lin:decay=linear"]
    argv += ["--steps", "40", "--seeds", "2", "--workers", "1", "--out", str(out)]
    return quality.main(argv, tasks=tasks), out


def test_outputs_have_every_task_contender_and_seed(sliced: tuple[dict, Path]) -> None:
    _, out = sliced
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["mode"] == "quick" and data["meta"]["seeds"] == [0, 1]
    assert list(data["tasks"]) == ["mlp", "circle", "mlp_3x"]
    for name in ("mlp", "circle"):
        assert list(data["tasks"][name]["contenders"]) == [*SLICE, "lin"]
    # off the tuned LR: only the off-LR fixed contenders and the surgeons
    off = [*[c for c in SLICE if c in qc.OFF_LR or c == "surgeon"], "lin"]
    assert list(data["tasks"]["mlp_3x"]["contenders"]) == off
    for task in data["tasks"].values():
        assert task["steps"] == 40
        for entry in task["contenders"].values():
            assert [run["seed"] for run in entry["runs"]] == [0, 1]
            for run in entry["runs"]:
                # 10 validations in --quick mode, the last one at the final step
                assert [step for step, _ in run["val"]] == list(range(4, 41, 4))
                assert run["final_val_loss"] == run["val"][-1][1]
                assert len(run["train_loss"]) == 40 and len(run["lr"]) == 40
    assert set(data["geomeans"]) == {"surgeon", "lin"}
    for name in ("mlp", "circle", "mlp_3x"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    text = (out / "results.md").read_text()
    for section in ("## Summary", "## Targets", "### mlp_3x", "## The surgeons' events"):
        assert section in text
    assert "- mlp, lin, seed 1: " in text
    # 2 seeds: a held-out oracle per tuned task, scored on each seed; the context beside the
    # issue's four targets
    assert [p["seed"] for p in data["tasks"]["mlp"]["heldout"]["picks"]] == [0, 1]
    assert data["tasks"]["mlp_3x"]["heldout"] is None
    assert len(data["targets"]) == 4 and len(data["context"]["rows"]) >= 2
    assert "| oracle loss | held-out oracle / oracle |" in text
    assert "| surgeon / oracle | surgeon / held-out oracle |" in text
    assert "| context, not a target: ratio to the held-out oracle" in text


def test_each_contender_drives_the_lr_it_should(sliced: tuple[dict, Path]) -> None:
    result, _ = sliced
    for name, task in result["summary"].items():
        peak = task["lr"]
        runs = {n: e["runs"][0] for n, e in task["contenders"].items()}
        assert runs["constant"]["lr"] == pytest.approx([peak] * 40)
        cosine = runs["w0_cosine"]["lr"]
        assert cosine[0] == pytest.approx(peak) and cosine == sorted(cosine, reverse=True)
        if name != "mlp_3x":
            wsd = runs["w20_wsd"]["lr"]  # 8 warmup steps from 0, the peak until step 32
            assert wsd[0] == 0.0 and wsd[8:32] == pytest.approx([peak] * 24)
            assert wsd[32:] == sorted(wsd[32:], reverse=True) and wsd[-1] < 0.2 * peak
        for surgeon in ("surgeon", "lin"):
            lrs = runs[surgeon]["lr"]
            assert lrs[0] < peak and max(lrs) == pytest.approx(peak)
        assert runs["schedule_free"]["lr"] == pytest.approx([peak] * 40)
        # every contender of a task starts from the same weights: the same first loss
        first = {n: r["train_loss"][0] for n, r in runs.items()}
        assert len({round(x, 6) for x in first.values()}) == 1, first
    assert result["summary"]["mlp_3x"]["lr"] == pytest.approx(3 * TASKS["mlp"].lr)
    ref = result["summary"]["mlp_3x"]["reference"]
    assert ref["task"] == "mlp" and ref["contender"] == result["summary"]["mlp"]["oracle"]


# ---------------------------------------------------------------------------- divergence


class _NaNCircle(quality_tasks.CircleNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step >= 5 else loss


class _FlatCircle(quality_tasks.CircleNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 0.0 + 1.0


class NaNCircleNet(quality_tasks.BenchMixin, _NaNCircle):
    """The circle net whose loss turns NaN from step 5 on."""


class FlatCircleNet(quality_tasks.BenchMixin, _FlatCircle):
    """A training loss that cannot improve: 1.0, whatever the weights."""


def _task_with(module: type, name: str) -> dict[str, quality_tasks.Task]:
    base = TASKS["circle"]

    def build(seed: int, steps: int) -> quality_tasks.Built:
        _, data = base.build(seed, steps)
        return module(hidden=16), data

    return {name: dataclasses.replace(base, name=name, build=build)}


def test_a_run_whose_loss_turns_nan_is_diverged(tmp_path: Path) -> None:
    tasks = _task_with(NaNCircleNet, "nan_circle")
    argv = ["--quick", "--contenders", "constant,surgeon", "--steps", "20", "--out", str(tmp_path)]
    result = quality.main([*argv, "--no-plots"], tasks=tasks)
    entries = result["summary"]["nan_circle"]["contenders"]
    for entry in entries.values():  # a non-finite step loss is a divergence, rescued or not
        assert entry["diverged"] == 1
        assert all(math.isnan(x) for x in entry["runs"][0]["train_loss"][5:])
    constant = entries["constant"]
    assert constant["finite"] == 0 and constant["score"] == math.inf
    data = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN as null
    run = data["tasks"]["nan_circle"]["contenders"]["constant"]["runs"][0]
    assert run["final_val_loss"] is None and run["diverged"] is True
    assert run["nonfinite_steps"] == 15
    assert "| constant | non-finite (1/1) |" in (tmp_path / "results.md").read_text()
    # the surgeon saw the non-finite losses and said so
    assert any(e["kind"] == "nonfinite" for e in entries["surgeon"]["runs"][0]["events"])


def test_reduce_on_plateau_steps_on_the_windowed_training_loss(tmp_path: Path) -> None:
    """100 steps: a window of 100 // 50 = 2 steps; torch's defaults (patience 10, factor 0.1)
    cut at the 12th evaluation (11 without improvement after the first), at the end of step 23:
    step 24 is the first to run at a tenth of the peak."""
    tasks = _task_with(FlatCircleNet, "flat_circle")
    argv = ["--contenders", "plateau", "--steps", "100", "--seeds", "1", "--out", str(tmp_path)]
    result = quality.main([*argv, "--no-plots"], tasks=tasks)
    lrs = result["summary"]["flat_circle"]["contenders"]["plateau"]["runs"][0]["lr"]
    peak = TASKS["circle"].lr
    assert lrs[:24] == pytest.approx([peak] * 24)
    assert lrs[24] == pytest.approx(0.1 * peak)


def test_reuse_takes_fixed_fits_and_reruns_surgeons(tmp_path: Path) -> None:
    tasks = {"mlp": TASKS["mlp"]}
    argv = ["--quick", "--contenders", "constant,surgeon", "--no-plots"]
    first = quality.main([*argv, "--steps", "20", "--out", str(tmp_path / "a")], tasks=tasks)
    reuse = ["--reuse", str(tmp_path / "a")]
    second = quality.main([*argv, "--steps", "20", "--out", str(tmp_path / "b"), *reuse], tasks)
    assert second["meta"]["reused"] == 1
    a, b = (r["summary"]["mlp"]["contenders"] for r in (first, second))
    assert b["constant"]["runs"][0].get("reused") and not b["surgeon"]["runs"][0].get("reused")
    assert b["constant"]["final_val_loss"] == a["constant"]["final_val_loss"]
    assert b["surgeon"]["final_val_loss"] == pytest.approx(a["surgeon"]["final_val_loss"])
    # another budget is another fit: nothing to reuse
    third = quality.main([*argv, "--steps", "30", "--out", str(tmp_path / "c"), *reuse], tasks)
    assert third["meta"]["reused"] == 0


def test_sweep_mode_trains_warmup_cosine_at_each_lr(tmp_path: Path) -> None:
    argv = ["--sweep", "--tasks", "mlp", "--sweep-lrs", "0.001,0.01", "--seeds", "1"]
    result = quality.main([*argv, "--steps", "20", "--out", str(tmp_path)], tasks=TASKS)
    sweep = result["sweep"]["mlp"]
    assert [p["lr"] for p in sweep["points"]] == [0.001, 0.01]
    assert sweep["choice"] in (0.001, 0.01) and sweep["edge"]
    assert "Record: `sweep=((0.001, " in (tmp_path / "results.md").read_text()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for argv in (
        ["--tasks", "nope"],
        ["--contenders", "constant,nope"],
        ["--tasks", "mlp", "--steps", "30"],  # not a multiple of the 20 validations
        ["--surgeon", "surgeon:decay=cosine"],  # a taken name
        ["--surgeon", "x:decay=nope"],
        ["--sweep", "--sweep-lrs", "0.1,x"],
    ):
        with pytest.raises(SystemExit):
            quality.main([*argv, "--out", str(tmp_path)], tasks=TASKS)


# ---------------------------------------------------------------------------- --quick, as CI


@pytest.mark.slow
def test_quick_mode_runs_every_task_but_the_probes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data["tasks"]) == [name for name, task in TASKS.items() if not task.probe]
    for name, task in data["tasks"].items():
        assert set(task["contenders"]) == set(qc.QUICK)
        assert (tmp_path / f"{name}.png").exists()
        assert task["reference"]["contender"] in (qc.COSINE, qc.SWEEP)
        assert task["heldout"] is None  # one seed: nothing to hold out
    assert len(data["targets"]) == 4 and all("surgeon" in r["results"] for r in data["targets"])
    text = (tmp_path / "results.md").read_text()
    assert "Held-out oracle: n/a (needs 2 or more seeds)." in text
    assert "| context, not a target: ratio to the held-out oracle" in text
