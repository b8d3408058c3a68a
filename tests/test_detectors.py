"""Tests for surgeon.detectors: scripted loss streams and the update where each must fire.

Every stream is a list of floats built here, noise from ``random.Random(seed)``; no torch. An
expected firing step is derived from the detector's documented definition (the EMA and drop
formulas in the module docstrings, evaluated in a few lines here) or from arithmetic on the
stream, never copied from a run. Indices are 0-based: index ``i`` is the ``i + 1``-th update.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from streams import noisy, trend_states

from surgeon.detectors import PlateauDetector, Signal, SpikeDetector, StabilizationDetector
from surgeon.detectors.spike import WINDOW_CAP

Detector = StabilizationDetector | PlateauDetector | SpikeDetector


def feed(detector: Detector, losses: Sequence[float]) -> list[Signal | None]:
    """The signal of every update, in order."""
    return [detector.update(loss) for loss in losses]


def fired(signals: Sequence[Signal | None], kind: Signal) -> list[int]:
    """Indices at which ``kind`` was returned."""
    return [i for i, signal in enumerate(signals) if signal is kind]


# --------------------------------------------------------------------------- stabilization


class TestStabilization:
    WINDOW, THRESHOLD, PATIENCE = 20, 0.02, 5

    def make(self) -> StabilizationDetector:
        return StabilizationDetector(self.WINDOW, self.THRESHOLD, self.PATIENCE)

    def reference(self, losses: Sequence[float]) -> list[tuple[str, bool, bool]]:
        return trend_states(losses, self.WINDOW, self.THRESHOLD, self.PATIENCE)

    def decay_then_flat(self, seed: int, noise: float = 0.002) -> list[float]:
        """A steep exponential decay (time constant 8 steps) for 80 steps, then flat at 1."""
        trend = [1.0 + 9.0 * math.exp(-t / 8.0) if t < 80 else 1.0 for t in range(200)]
        return noisy(trend, noise, seed)

    @pytest.mark.parametrize("seed", [0, 1, 2])
    @pytest.mark.parametrize("noise", [0.002, 0.05])
    def test_every_update_is_classified_as_the_definition_says(
        self, seed: int, noise: float
    ) -> None:
        losses = self.decay_then_flat(seed, noise)
        losses[120:150] = [x * (1.0 + 0.02 * k) for k, x in enumerate(losses[120:150])]  # a rise
        detector = self.make()
        expected = self.reference(losses)
        for loss, (state, steep_seen, stabilized) in zip(losses, expected, strict=True):
            signal = detector.update(loss)
            assert (signal is Signal.RISING) == (state == "rising")
            assert (signal is Signal.STABILIZED) == stabilized
            assert detector.steep_seen == steep_seen
        states = [state for state, _, _ in expected]
        assert {"steep", "settled", "rising"} <= set(states)  # the stream has all three

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_fires_once_the_descent_has_slowed_and_keeps_firing_on_the_flat(
        self, seed: int
    ) -> None:
        losses = self.decay_then_flat(seed)
        firings = fired(feed(self.make(), losses), Signal.STABILIZED)
        trend = [1.0 + 9.0 * math.exp(-t / 8.0) for t in range(len(losses))]
        # the noiseless curve's own relative drop per window first falls below threshold here
        raw_slow = next(
            t
            for t in range(self.WINDOW, len(trend))
            if (trend[t - self.WINDOW] - trend[t]) / trend[t - self.WINDOW] < self.THRESHOLD
        )
        # the EMA lags the loss: it settles no earlier than the loss itself (plus patience), and
        # not much later (a ~window time constant)
        assert raw_slow + self.PATIENCE - 1 <= firings[0] <= raw_slow + 3 * self.WINDOW
        assert firings == list(range(firings[0], len(losses)))

    def test_never_fires_while_falling_faster_than_threshold_per_window(self) -> None:
        # the loss falls by 10% per window, five times the threshold, forever
        rate = 0.9 ** (1.0 / self.WINDOW)
        losses = [5.0 * rate**t for t in range(600)]
        detector = self.make()
        drops = []
        for loss in losses:
            assert detector.update(loss) is None
            drops.append(detector.last_drop)
        measured = [d for d in drops if d is not None]
        assert len(measured) == len(losses) - self.WINDOW
        assert min(measured) > self.THRESHOLD
        # the EMA of a geometric sequence is geometric with the same ratio in the long run
        assert measured[-1] == pytest.approx(1.0 - 0.9, rel=1e-6)
        assert detector.steep_seen

    def test_a_rising_loss_is_rising_never_settled(self) -> None:
        losses = [1.0 + 0.01 * t for t in range(100)]  # ~20% per window of 20
        detector = self.make()
        signals = feed(detector, losses)
        # from the first measured drop on, every update is a rise
        assert fired(signals, Signal.RISING) == list(range(self.WINDOW, len(losses)))
        assert Signal.STABILIZED not in signals
        assert detector.last_drop is not None and detector.last_drop < 0
        assert detector.rise_run == len(losses) - self.WINDOW
        # the rise is measured from the EMA a window before the first rising update: the first loss
        assert detector.rise_base == losses[0]

    def test_a_rise_within_the_noise_is_not_rising(self) -> None:
        """A 3% rise per window is over the threshold, but on a stream with 20% noise it is not
        beyond doubt (the drop's noise is ~4%): settled, not rising."""
        base = noisy([1.0] * 400, 0.2, seed=3)
        losses = [x * (1.0 + 0.03 * t / self.WINDOW) for t, x in enumerate(base)]
        expected = self.reference(losses)
        signals = feed(self.make(), losses)
        rising = fired(signals, Signal.RISING)
        assert rising == [t for t, (state, _, _) in enumerate(expected) if state == "rising"]
        assert len(rising) < 0.2 * len(losses)
        # the same rise on a quiet stream (0.2% noise) is rising from its first window on
        quiet = [
            x * (1.0 + 0.03 * t / self.WINDOW) for t, x in enumerate(noisy([1.0] * 400, 0.002, 3))
        ]
        assert len(fired(feed(self.make(), quiet), Signal.RISING)) > 0.8 * len(quiet)

    def test_no_stabilization_before_a_descent_was_seen(self) -> None:
        """A flat stream is settled from its first window on, but nothing fell: it is not a
        descent that stabilized (a saddle, or a loss that never moved)."""
        detector = self.make()
        signals = feed(detector, noisy([2.0] * 300, 0.01, seed=4))
        assert signals == [None] * 300 and not detector.steep_seen
        # nor is a loss settling a few percent from its first values (sparse parity's first
        # steps: from ~0.72 to ln 2): a few steep updates, fewer than patience in a row
        detector = self.make()
        settle = noisy([0.693 + 0.035 * math.exp(-t / 3.0) for t in range(300)], 0.01, seed=5)
        feed(detector, settle)
        states = [state for state, _, _ in self.reference(settle)]
        assert 0 < states.count("steep") < self.PATIENCE and not detector.steep_seen

    def test_a_descent_then_a_flat_stream_stabilizes_after_patience(self) -> None:
        flat = [2.0] * 40
        cliff = [2.0 * 0.97**k for k in range(1, 41)]  # falls 3% per step for 40 steps
        losses = flat + cliff + [cliff[-1]] * 100
        expected = self.reference(losses)
        firings = fired(feed(self.make(), losses), Signal.STABILIZED)
        assert firings == [t for t, (_, _, stabilized) in enumerate(expected) if stabilized]
        steep = [t for t, (state, _, _) in enumerate(expected) if state == "steep"]
        # silent on the first flat part and through the cliff, settled again after it
        assert steep and len(flat) <= steep[0] and firings[0] > steep[-1] + self.PATIENCE - 1
        assert firings[-1] == len(losses) - 1


# --------------------------------------------------------------------------------- plateau


class TestPlateau:
    @pytest.mark.parametrize(("patience", "cooldown"), [(10, 15), (7, 0), (1, 3)])
    def test_flat_stream_fires_after_patience_then_every_cooldown_plus_patience(
        self, patience: int, cooldown: int
    ) -> None:
        detector = PlateauDetector(patience=patience, cooldown=cooldown)
        n = 200
        signals = feed(detector, [3.0] * n)
        # the EMA (span = patience) warms up for ceil(1 / alpha) updates; the first update after
        # that sets the best, and the next `patience` updates do not improve on it
        first_best = math.ceil(1.0 / detector.alpha) - 1
        expected = list(range(first_best + patience, n, cooldown + patience))
        assert fired(signals, Signal.PLATEAU) == expected

    @pytest.mark.parametrize("seed", [0, 1])
    def test_steadily_improving_stream_never_fires(self, seed: int) -> None:
        # 0.5% better per step with 2% noise: the EMA beats its best by min_delta every few steps
        losses = noisy([4.0 * 0.995**t for t in range(2000)], 0.02, seed)
        assert fired(feed(PlateauDetector(patience=25, cooldown=25), losses), Signal.PLATEAU) == []

    def test_min_delta_is_relative_and_strict(self) -> None:
        """With ``alpha=1`` the EMA is the loss: a staircase falling by ``f`` every 4 updates."""
        patience, min_delta, period = 5, 0.01, 4

        def staircase(f: float) -> list[float]:
            return [2.0 * (1.0 - f) ** (t // period) for t in range(100)]

        def run(f: float) -> list[int]:
            detector = PlateauDetector(patience=patience, min_delta=min_delta, cooldown=0, alpha=1)
            return fired(feed(detector, staircase(f)), Signal.PLATEAU)

        # each stair improves by more than min_delta: at most period - 1 bad updates in a row
        assert run(1.1 * min_delta) == []
        # stairs of 0.9 min_delta: the first does not count, so update `patience` is the
        # patience-th without improvement (the second stair improves on the best only later)
        assert (1.0 - 0.9 * min_delta) ** 2 < 1.0 - min_delta
        assert run(0.9 * min_delta)[0] == patience

    def test_min_delta_zero_counts_every_decrease(self) -> None:
        losses = [1.0 - 1e-6 * t for t in range(300)]
        # the whole stream falls by 0.03%, less than min_delta=1e-3 over any stretch
        assert (losses[0] - losses[-1]) / losses[0] < 1e-3
        strict = PlateauDetector(patience=50, min_delta=0.0, cooldown=0)
        assert fired(feed(strict, losses), Signal.PLATEAU) == []
        relative = PlateauDetector(patience=50, min_delta=1e-3, cooldown=0)
        first_best = math.ceil(1.0 / relative.alpha) - 1  # after the EMA's warm-up
        expected = list(range(first_best + 50, 300, 50))
        assert fired(feed(relative, losses), Signal.PLATEAU) == expected

    def test_improvement_during_cooldown_moves_best(self) -> None:
        detector = PlateauDetector(patience=5, cooldown=10, alpha=1)
        signals = feed(detector, [1.0] * 6)
        assert fired(signals, Signal.PLATEAU) == [5]
        assert detector.update(0.5) is None  # in cooldown, but a new best all the same
        assert detector.best == 0.5


# ----------------------------------------------------------------------------------- spike


def exp_fall(n: int, tau: float, start: float = 5.0, end: float = 1.0) -> list[float]:
    """A steep exponential descent from ``start`` towards ``end`` (time constant ``tau``)."""
    return [end + (start - end) * math.exp(-t / tau) for t in range(n)]


def calm_stream(n: int, seed: int, level: float = 1.0, rel_sigma: float = 0.01) -> list[float]:
    return noisy([level] * n, rel_sigma, seed)


class TestSpike:
    @pytest.mark.parametrize("min_obs", [5, 20])
    def test_no_firing_before_min_observations(self, min_obs: int) -> None:
        base = calm_stream(60, seed=3)
        for k in range(1, min_obs + 1):
            losses = list(base)
            losses[k] = 10.0 * base[k]
            signals = feed(SpikeDetector(min_observations=min_obs), losses)
            # `count` finite losses came before index k; a spike needs count >= min_obs
            assert fired(signals, Signal.SPIKE) == ([k] if k == min_obs else []), k

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_ten_x_outlier_fires_once(self, seed: int) -> None:
        losses = calm_stream(300, seed)
        losses[150] *= 10.0
        assert fired(feed(SpikeDetector(), losses), Signal.SPIKE) == [150]

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_nonfinite_fires_and_leaves_statistics_untouched(self, bad: float) -> None:
        detector = SpikeDetector()
        feed(detector, calm_stream(50, seed=4))
        before = detector.state_dict()
        assert detector.update(bad) is Signal.NONFINITE
        assert detector.state_dict() == before
        # also before any finite loss was seen
        fresh = SpikeDetector()
        assert fresh.update(bad) is Signal.NONFINITE
        assert fresh.state_dict() == SpikeDetector().state_dict()

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_a_spike_moves_the_statistics_no_more_than_an_ordinary_loss(self, seed: int) -> None:
        detector = SpikeDetector()
        feed(detector, calm_stream(200, seed))
        twin = copy.deepcopy(detector)
        level, var = detector.mean, detector.var
        assert detector.update(10.0 * level) is Signal.SPIKE
        # the level (a median) moves as if the spike were the largest loss of the window
        assert twin.update(max(twin.recent)) is None
        assert detector.mean == twin.mean and abs(detector.mean - level) < 0.01 * level
        # its difference enters the noise clipped at zscore x sqrt(v)
        assert detector.var <= var + detector.alpha * (detector.zscore**2 - 1.0) * var * (1 + 1e-12)
        # an equal second spike right after is still a spike, and so is a third
        assert detector.update(10.0 * level) is Signal.SPIKE
        assert detector.update(10.0 * level) is Signal.SPIKE

    @pytest.mark.parametrize(("at", "seed"), [(15, 0), (60, 1), (60, 2), (120, 3)])
    def test_a_x20_spike_in_a_steep_descent_is_caught(self, at: int, seed: int) -> None:
        """Early in a run the loss falls steeply; the noise comes from step-to-step differences,
        so the descent does not hide a spike (an EMA variance of the loss held z=1.99 here)."""
        losses = noisy(exp_fall(300, tau=40.0), 0.02, seed)
        losses[at] *= 20.0
        detector = SpikeDetector()
        signals = feed(detector, losses)
        assert fired(signals, Signal.SPIKE) == [at]
        # the descent itself, up to the spike: z within the normal band (below the level)
        twin = SpikeDetector()
        zs = [(twin.update(x), twin.last_zscore)[1] for x in losses[:at]]
        assert max(zs[twin.min_observations :]) < 3.0

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_right_after_a_fast_descent_the_band_is_the_noise_of_now(self, seed: int) -> None:
        """The level falls 100x in 150 steps, the noise 30% of it: the EMA of squared
        differences still holds the steep part's large ones at step 150 (a x10 spike went
        unseen); capped at 3x the noise of the last window's differences, sigma is the noise
        of now and a x10 spike counts."""
        losses = noisy([0.01 ** min(1.0, t / 150) for t in range(151)], 0.3, seed)
        detector = SpikeDetector()
        feed(detector, losses)
        now = 0.3 * 0.01  # sigma of the losses at step 150
        assert math.sqrt(detector.var / 2.0) > 5 * now  # the EMA alone: the old blind spot
        assert detector.std <= WINDOW_CAP * 1.6 * now
        assert detector.update(10.0 * detector.mean) is Signal.SPIKE

    def test_the_window_cap_does_not_narrow_a_stationary_band(self) -> None:
        """On a stationary stream the window's (noisy) median binds the cap rarely and never
        below the EMA's own low readings: the cap adds no false alarms there."""
        capped = total = 0
        lowest_std = lowest_ema = math.inf
        for seed in range(20):
            rng = random.Random(seed)
            detector = SpikeDetector()
            for t in range(2000):
                detector.update(3.0 + 0.1 * rng.gauss(0.0, 1.0))
                if t >= 100:
                    ema = math.sqrt(detector.var / 2.0)
                    capped += detector.std < ema
                    total += 1
                    lowest_std, lowest_ema = min(lowest_std, detector.std), min(lowest_ema, ema)
        assert capped / total < 0.005
        assert lowest_std >= lowest_ema > 0.5 * 0.1

    @pytest.mark.parametrize("seed", range(10))
    def test_a_loss_crossing_zero_makes_no_false_spike(self, seed: int) -> None:
        """Noise is measured in absolute differences, so a level passing through 0 (a loss
        with negative values) is no special case (a noise relative to the level made false
        spikes here)."""
        rng = random.Random(seed)
        losses = [1.0 - 2.0 * t / 2000 + rng.gauss(0.0, 0.05) for t in range(2000)]
        assert fired(feed(SpikeDetector(), losses), Signal.SPIKE) == []

    def test_a_state_without_the_cap_window_loads_and_fills_it_again(self) -> None:
        detector = SpikeDetector()
        feed(detector, calm_stream(100, seed=5))
        old = {k: v for k, v in detector.state_dict().items() if k != "diffs"}
        restored = SpikeDetector()
        restored.load_state_dict(old)
        assert restored.std == math.sqrt(detector.var / 2.0)  # no window yet: the EMA alone
        feed(restored, calm_stream(restored.window, seed=6))
        assert len(restored.diffs) == restored.window
        assert restored.update(10.0) is Signal.SPIKE

    def test_a_spike_on_a_perfectly_flat_stream_does_not_poison_it(self) -> None:
        """std is exactly 0 here: the z-score cap is no cap, the spike must still not leak in."""
        detector = SpikeDetector()
        feed(detector, [1.0] * 50)
        assert detector.std == 0.0
        assert detector.update(10.0) is Signal.SPIKE
        # no more than a loss at the ratio threshold (1.5x the mean) would have moved it
        assert detector.mean <= 1.0 + detector.alpha * (detector.ratio - 1.0) * (1 + 1e-12)
        assert detector.update(10.0) is Signal.SPIKE

    @pytest.mark.parametrize("level", [1.0, 0.0])
    def test_a_level_shift_is_absorbed(self, level: float) -> None:
        detector = SpikeDetector()
        shift = 10.0 if level else 1.0
        before = calm_stream(100, seed=5, level=level) if level else [0.0] * 100
        after = calm_stream(500, seed=6, level=shift)
        feed(detector, before)
        firings = fired(feed(detector, after), Signal.SPIKE)
        half = detector.window // 2
        if level:
            # spikes until the shift is the median of the window (halfway, at step half, the
            # median is between the levels), then the new level
            assert firings == list(range(half + 1))
        else:
            # an all-zero stream has no scale: nothing is "x times" its level of 0, and a jump
            # from it teaches no spread; only at step half, with the median halfway at 0.5, is
            # a loss of 1 "2x" a non-zero level with no spread known
            assert firings == [half]
        # a lasting shift is the new level once it fills half the window
        assert detector.mean == pytest.approx(shift, rel=0.03)

    def test_zscore_alone_does_not_fire(self) -> None:
        detector = SpikeDetector()
        feed(detector, calm_stream(200, seed=7, rel_sigma=1e-4))
        bump = detector.mean * 1.01
        z = (bump - detector.mean) / detector.std
        assert z > detector.zscore  # far outside the band...
        assert bump - detector.mean < (detector.ratio - 1.0) * abs(detector.mean)  # ...but small
        assert detector.update(bump) is None

    def test_ratio_alone_does_not_fire(self) -> None:
        detector = SpikeDetector()
        rng = random.Random(8)
        feed(detector, [rng.uniform(0.1, 1.9) for _ in range(300)])
        high = detector.mean * 2.2
        assert high - detector.mean > (detector.ratio - 1.0) * abs(detector.mean)  # 2.2x...
        assert (high - detector.mean) / detector.std < detector.zscore  # ...but ordinary noise
        assert detector.update(high) is None

    def test_both_conditions_fire(self) -> None:
        detector = SpikeDetector(zscore=4.0, ratio=1.2)
        feed(detector, calm_stream(100, seed=9))
        high = detector.mean * 1.25
        assert (high - detector.mean) / detector.std > detector.zscore
        assert high - detector.mean > (detector.ratio - 1.0) * abs(detector.mean)
        assert detector.update(high) is Signal.SPIKE

    def test_last_zscore_is_the_latest_standardised_excess(self) -> None:
        detector = SpikeDetector()
        feed(detector, calm_stream(100, seed=10))
        mean, std = detector.mean, detector.std
        detector.update(mean + 2.5 * std)
        assert detector.last_zscore == pytest.approx(2.5)


# ---------------------------------------------------------------------- shared behaviours

Factory = Callable[[], Detector]


def _mixed_stream(seed: int) -> list[float]:
    """Decay, a flat stretch, a spike, a NaN and an inf: something for every detector."""
    trend = [1.0 + 4.0 * math.exp(-t / 30.0) for t in range(150)] + [1.0] * 150
    losses = noisy(trend, 0.01, seed)
    losses[120] *= 10.0
    losses[200] = math.nan
    losses[201] = math.inf
    return losses


FACTORIES: dict[str, Factory] = {
    "stabilization": lambda: StabilizationDetector(window=15, threshold=0.02, patience=4),
    "plateau": lambda: PlateauDetector(patience=15, cooldown=10, min_delta=5e-3, alpha=0.2),
    "spike": lambda: SpikeDetector(min_observations=10),
}


def _finite_only(name: str, losses: list[float]) -> list[float]:
    """Stabilization and plateau are fed finite losses only (the controller filters)."""
    return losses if name == "spike" else [x for x in losses if math.isfinite(x)]


class TestExtremes:
    """Streams at the edge of the float range or of the statistics' meaning."""

    def test_an_all_zero_stream_has_no_scale_so_a_tiny_positive_loss_is_no_spike(self) -> None:
        det = SpikeDetector()
        assert [det.update(0.0) for _ in range(30)] == [None] * 30
        assert det.update(1e-9) is None

    def test_a_loss_whose_square_overflows_leaves_the_statistics_finite(self) -> None:
        det = SpikeDetector()
        for loss in [1.0] * 5 + [1e200] + [1.0 + 0.01 * (i % 3) for i in range(100)]:
            det.update(loss)
        assert math.isfinite(det.mean) and math.isfinite(det.var)
        assert det.update(1000.0) is Signal.SPIKE  # still watching

    @pytest.mark.parametrize("patience", [97, 195, 205, 213, 10])
    def test_plateau_keeps_its_first_best_after_exactly_its_span(self, patience: int) -> None:
        det = PlateauDetector(patience=patience)
        seen = 0
        while det.best is None:
            det.update(1.0)
            seen += 1
        assert seen == math.ceil((patience + 1) / 2)  # 1 / alpha, alpha = 2 / (patience + 1)

    def test_stabilization_is_the_same_at_any_scale(self) -> None:
        def fired(scale: float) -> list[Signal | None]:
            det = StabilizationDetector(window=10, threshold=0.02, patience=3)
            return [det.update(scale * 0.9**i) for i in range(60)]

        assert fired(1e-13) == fired(1.0) == fired(1e13)


class TestStateDict:
    @pytest.mark.parametrize("name", list(FACTORIES))
    @pytest.mark.parametrize("cut", [0, 5, 60, 121, 180, 260])
    def test_round_trip_gives_identical_outputs(self, name: str, cut: int) -> None:
        losses = _finite_only(name, _mixed_stream(seed=11))
        original = FACTORIES[name]()
        head = feed(original, losses[:cut])
        state = json.loads(json.dumps(copy.deepcopy(original.state_dict())))
        restored = FACTORIES[name]()
        restored.load_state_dict(state)
        tail_original = feed(original, losses[cut:])
        tail_restored = feed(restored, losses[cut:])
        assert tail_restored == tail_original
        assert restored.state_dict() == original.state_dict()
        # the stream exercises the detector at all (each fires somewhere in it)
        assert any(s is not None for s in head + tail_original)

    @pytest.mark.parametrize("name", list(FACTORIES))
    def test_state_dict_is_a_snapshot(self, name: str) -> None:
        losses = _finite_only(name, _mixed_stream(seed=12))
        detector = FACTORIES[name]()
        feed(detector, losses[:100])
        state = detector.state_dict()
        frozen = copy.deepcopy(state)
        feed(detector, losses[100:])
        assert state == frozen

    @pytest.mark.parametrize("name", list(FACTORIES))
    def test_reset_behaves_like_a_fresh_detector(self, name: str) -> None:
        losses = _finite_only(name, _mixed_stream(seed=13))
        used = FACTORIES[name]()
        feed(used, losses)
        used.reset()
        fresh = FACTORIES[name]()
        assert used.state_dict() == fresh.state_dict()
        assert feed(used, losses) == feed(fresh, losses)


class TestValidation:
    @pytest.mark.parametrize(
        ("cls", "kwargs", "field"),
        [
            (StabilizationDetector, {"window": 0}, "stabilize_window"),
            (StabilizationDetector, {"window": 2.5}, "stabilize_window"),
            (StabilizationDetector, {"window": True}, "stabilize_window"),
            (StabilizationDetector, {"threshold": 0.0}, "stabilize_threshold"),
            (StabilizationDetector, {"threshold": 1.0}, "stabilize_threshold"),
            (StabilizationDetector, {"threshold": math.nan}, "stabilize_threshold"),
            (StabilizationDetector, {"patience": 0}, "stabilize_patience"),
            (StabilizationDetector, {"patience": -3}, "stabilize_patience"),
            (PlateauDetector, {"patience": 0}, "plateau_patience"),
            (PlateauDetector, {"patience": 1.0}, "plateau_patience"),
            (PlateauDetector, {"min_delta": -0.1}, "plateau_min_delta"),
            (PlateauDetector, {"min_delta": 1.0}, "plateau_min_delta"),
            (PlateauDetector, {"min_delta": math.inf}, "plateau_min_delta"),
            (PlateauDetector, {"cooldown": -1}, "plateau_cooldown"),
            (PlateauDetector, {"cooldown": False}, "plateau_cooldown"),
            (PlateauDetector, {"alpha": 0.0}, "plateau_alpha"),
            (PlateauDetector, {"alpha": 1.5}, "plateau_alpha"),
            (SpikeDetector, {"zscore": 0.0}, "spike_zscore"),
            (SpikeDetector, {"zscore": -6.0}, "spike_zscore"),
            (SpikeDetector, {"zscore": math.inf}, "spike_zscore"),
            (SpikeDetector, {"zscore": True}, "spike_zscore"),
            (SpikeDetector, {"ratio": 0.9}, "spike_ratio"),
            (SpikeDetector, {"ratio": math.nan}, "spike_ratio"),
            (SpikeDetector, {"alpha": 0.0}, "spike_alpha"),
            (SpikeDetector, {"alpha": 2.0}, "spike_alpha"),
            (SpikeDetector, {"min_observations": 0}, "spike_min_observations"),
            (SpikeDetector, {"min_observations": 3.0}, "spike_min_observations"),
        ],
    )
    def test_bad_value_names_the_field(
        self, cls: type[Detector], kwargs: dict[str, Any], field: str
    ) -> None:
        value = next(iter(kwargs.values()))
        with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
            cls(**kwargs)

    @pytest.mark.parametrize(
        ("cls", "kwargs"),
        [
            (StabilizationDetector, {"window": 1, "threshold": 1e-9, "patience": 1}),
            (PlateauDetector, {"patience": 1, "min_delta": 0.0, "cooldown": 0, "alpha": 1.0}),
            (SpikeDetector, {"zscore": 1e-9, "ratio": 1.0, "alpha": 1.0, "min_observations": 1}),
        ],
    )
    def test_boundary_values_are_accepted(
        self, cls: type[Detector], kwargs: dict[str, Any]
    ) -> None:
        detector = cls(**kwargs)
        for key, value in kwargs.items():
            assert getattr(detector, key) == value
