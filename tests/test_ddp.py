"""Two real DDP processes on CPU (gloo) make one decision: same LRs, same events, same state.

``tests/ddp_worker.py`` runs ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` in a
subprocess (Lightning starts rank 1 itself), with a 20x loss spike (two steps: the second
confirms it) and, earlier, a NaN loss
injected on rank 1 only.
Each rank writes what it saw; this test compares the two files. The ranks train on
different halves of the data, so their local losses differ every step: equal LRs can only
come from the feed averaging the losses across ranks before anything reads them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
TIMEOUT_S = 180
STEPS, SPIKE_STEP, SPIKE_RANK, READBACK_EVERY, NAN_STEP = 60, 40, 1, 4, 25
# launcher/cluster variables that would make Lightning think it is already inside a job
_JOB_VARS = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker(out_dir: Path, *args: str, script: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the worker (both ranks) and return the two ranks' records (``rank<r>.json`` in
    ``out_dir``), rank 0 first; ``script``: another program and its arguments than
    ``ddp_worker.py OUT_DIR``."""
    env = {k: v for k, v in os.environ.items() if k not in _JOB_VARS and not k.startswith("SLURM")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
    )
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no network needed
    cmd = [sys.executable, *(script or [str(WORKER), str(out_dir)]), *args]
    # own session, so a timeout kills rank 1 (a child of rank 0) too
    proc = subprocess.Popen(
        cmd,
        cwd=out_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"DDP worker timed out after {TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"DDP worker failed ({proc.returncode}):\n{output[-4000:]}"
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


# ~90% of the time is two serial imports of torch + Lightning: 18-24 s on a loaded 2-core box
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    records = run_worker(
        out_dir,
        f"--steps={STEPS}",
        f"--spike-step={SPIKE_STEP}",
        f"--spike-rank={SPIKE_RANK}",
        f"--readback-every={READBACK_EVERY}",
        f"--nan-step={NAN_STEP}",
    )
    records[0]["events_file"] = (out_dir / "events.jsonl").read_text().splitlines()
    return records


def test_it_really_ran_two_ranks_on_different_data(ranks: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks)
    assert [len(r["lrs"]) for r in ranks] == [STEPS, STEPS]
    local = [[loss for _, loss in r["losses"]] for r in ranks]
    assert all(a != b for a, b in zip(*local, strict=True)), (
        "ranks saw the same data: the test proves nothing"
    )


def test_per_step_lrs_are_equal_on_both_ranks(ranks: list[dict[str, Any]]) -> None:
    lrs0, lrs1 = ranks[0]["lrs"], ranks[1]["lrs"]
    assert [s for s, _ in lrs0] == list(range(STEPS))
    assert lrs0 == lrs1  # exactly: same floats, same steps
    assert len({lr for _, lr in lrs0}) > 10  # the surgeon really moved the LR


def test_spike_on_one_rank_is_one_decision_on_both(ranks: list[dict[str, Any]]) -> None:
    local_at_spike = [dict(map(tuple, r["losses"]))[SPIKE_STEP] for r in ranks]
    assert local_at_spike[SPIKE_RANK] > 10 * local_at_spike[1 - SPIKE_RANK]  # one rank only
    events0, events1 = ranks[0]["events"], ranks[1]["events"]
    assert events0 == events1
    assert [SPIKE_STEP + 1, "spike"] in events0  # the next loss confirms it
    # the cut shows in the LR of the steps after the decision, on both ranks alike
    lrs = dict(map(tuple, ranks[0]["lrs"]))
    assert lrs[STEPS - 1] < lrs[SPIKE_STEP]


def test_controller_state_is_identical_on_both_ranks(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["steps"] == ranks[1]["steps"] == STEPS
    assert ranks[0]["controller"] == ranks[1]["controller"]
    state = json.loads(ranks[0]["controller"])
    assert state["step"] >= STEPS - 2 * READBACK_EVERY  # losses are read up to 2 blocks late


def test_one_small_all_reduce_per_block_and_nothing_else(ranks: list[dict[str, Any]]) -> None:
    """The per-step hooks call exactly one collective per block of ``readback_every`` steps: an
    all-reduce of ``2 x readback_every`` floats (the block's losses and the guard's flags).

    In particular no ``barrier``: on NCCL a barrier blocks the host on the GPU (Lightning's
    ``strategy.reduce`` runs one before every all-reduce, which is why the surgeon does not
    use it); on CPU CI this count is how that stays checked. The guard adds none: DDP has
    averaged the gradients it checks.
    """
    blocks = list(range(READBACK_EVERY, STEPS + 1, READBACK_EVERY))
    block = [["all_reduce", 2 * READBACK_EVERY]]
    for record in ranks:
        assert record["collectives"] == [["end", step, block] for step in blocks]


def test_only_rank_zero_writes_the_event_log(ranks: list[dict[str, Any]]) -> None:
    logged = [json.loads(line) for line in ranks[0]["events_file"]]
    assert [[e["step"], e["kind"]] for e in logged] == ranks[0]["events"]  # once, not twice


def test_a_nan_on_one_rank_is_skipped_on_both_and_the_weights_stay_equal(
    ranks: list[dict[str, Any]],
) -> None:
    """DDP averages the gradients before the guard looks, so rank 1's NaN is every rank's:
    both skip the update (no collective of the guard's own, see the test above)."""
    for record in ranks:
        assert [NAN_STEP, "nonfinite"] in record["events"]
        assert [NAN_STEP, "skipped_step"] in record["events"]
        assert record["nan_step_changed_weights"] is False
    weights0, weights1 = ranks[0]["weights"], ranks[1]["weights"]
    assert weights0 == weights1  # bit for bit
    assert all(math.isfinite(w) for w in weights0)


def test_a_severe_spike_on_one_rank_rolls_back_both(ranks: list[dict[str, Any]]) -> None:
    """The 20x spike on rank 1 averages to ~10x the mean: a rollback, on both ranks alike."""
    for record in ranks:
        assert [SPIKE_STEP + 1, "rollback"] in record["events"]


@pytest.mark.slow
def test_an_early_stopping_cooldown_reads_the_same_on_both_ranks(tmp_path: Path) -> None:
    """EarlyStopping's wait counts are per rank (here rank 0's val_loss stalls, rank 1's keeps
    improving): rank zero decides the cooldown and its reason, so both ranks record the same
    event, text included, and write the same LRs."""
    ranks = run_worker(tmp_path, "--early-stopping", "--steps=200", "--spike-step=-1")
    cooldowns = [
        [why for (_, k), why in zip(r["events"], r["reasons"], strict=True) if k == "cooldown"]
        for r in ranks
    ]
    assert cooldowns[0] and cooldowns[0] == cooldowns[1]
    assert "has seen 2 checks in a row without improvement" in cooldowns[0][0]
    assert ranks[0]["lrs"] == ranks[1]["lrs"]


def test_the_callback_pickles_for_ddp_spawn(tmp_path: Path, ranks: list[dict[str, Any]]) -> None:
    """``strategy="ddp_spawn"`` pickles the Trainer's callbacks into two new processes (a lambda
    held by the callback failed there before the first step): both ranks make the decisions of
    the ``ddp`` run of the same script, LRs, events and final weights alike."""
    import pickle

    from surgeon import ScheduleSurgeon

    restored = pickle.loads(pickle.dumps(ScheduleSurgeon(spike_zscore=5.0)))
    assert restored.config.spike_zscore == 5.0
    spawned = run_worker(
        tmp_path,
        "--strategy=ddp_spawn",
        f"--steps={STEPS}",
        f"--spike-step={SPIKE_STEP}",
        f"--spike-rank={SPIKE_RANK}",
        f"--readback-every={READBACK_EVERY}",
        f"--nan-step={NAN_STEP}",
    )
    assert spawned[0]["lrs"] == spawned[1]["lrs"] == ranks[0]["lrs"]
    assert spawned[0]["events"] == spawned[1]["events"] == ranks[0]["events"]
    assert spawned[0]["weights"] == ranks[0]["weights"]
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [[e["step"], e["kind"]] for e in logged] == ranks[0]["events"]
