"""The peak LR an LR range test suggests: a small, framework-free rule on its ``(lr, loss)`` curve.

A range test (Smith 2017; Lightning's ``lr_find``) trains for a few steps while the LR grows
exponentially, and records each step's loss. :func:`suggest_lr` reads that curve:

1. the curve ends at its first non-finite loss (the run blew up there);
2. the losses are smoothed by a **centred** moving average of their logarithms over
   ``SMOOTH_FRACTION`` of the points (5%, at least 3; cut short by the ends of the curve):
   centred, so the smoothed curve does not lag behind the LR (an exponential moving average,
   as Lightning's and fastai's curves are, puts its minimum late: with beta=0.98 over 100 steps,
   by up to two decades of LR); logarithms, so the rule is the same at any loss scale;
3. the run **diverged** at the first point where the smoothed loss is ``DIVERGENCE`` (2x) its
   lowest value so far; only the points before it count;
4. the suggestion is the LR at the **minimum** of the smoothed loss divided by ``FACTOR``
   (10): the minimum is where the loss stops improving and starts to blow up, and a tenth of
   that is the classic safe peak (fastai's ``minimum`` suggestion; Smith 2017 takes the maximum
   LR a little below where the loss climbs);
   A minimum at the range's end with no divergence means the test stopped before the loss
   turned up: the suggestion says so (``at_end``), and may be low;
5. a curve whose smoothed minimum is less than ``MIN_DROP`` (10%) below where it started
   learned nothing in the test (e.g. a loss plateau, as sparse parity sits at ln 2): its
   minimum is noise, so the LR where it diverged, divided by ``FACTOR``, is the suggestion, and
   without a divergence there is none (``None``).

Why not Lightning's ``suggestion()``: it takes the steepest slope of the loss against the *linear*
LR, which on an exponential sweep is dominated by noise at the smallest LRs; on the circle
example it picked 6.3e-5 against a configured 0.1 and the fit's accuracy fell from 0.989 to 0.60.
Why not the minimum of Lightning's own smoothed curve: it is a lagging EMA, bias-corrected one
step off (its first value is half the first loss), so its minimum depends on ``find_steps``.

Checked (``tests/test_lr_find.py``) on range tests recorded from the outcome benchmark's tasks
of 9402cc6 and from the examples (``benchmarks/lr_find_curves.py``, ``tests/data/``): on each,
the suggestion trains to a final validation loss within 1.7x of the best peak LR of a sweep.
On the benchmark's later tasks it does not everywhere (README, *Automatic peak LR*).
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

FACTOR = 10.0
"""The suggestion is the LR at the smoothed loss's minimum divided by this."""
SMOOTH_FRACTION = 0.05
"""The smoothing window spans this share of the curve's points (at least 3)."""
DIVERGENCE = 2.0
"""The curve has diverged once its smoothed loss is this multiple of its lowest so far."""
MIN_DROP = 0.1
"""A minimum less than this fraction below the start of the curve is noise, not learning."""
NOISE_Z = 4.0
"""...and at least this many standard deviations of the smoothed curve's noise."""
MIN_POINTS = 10
"""Fewer finite points than this give no suggestion."""


def smooth_log(losses: Sequence[float]) -> list[float]:
    """Centred moving average of ``log(loss)`` over ``SMOOTH_FRACTION`` of the points (``2h + 1``
    of them); within ``h`` points of an end the window is cut short by the end (the first value
    averages the first ``h + 1`` points), so no smoothed point rests on a single noisy loss."""
    logs = [math.log(loss) for loss in losses]
    half = max(1, round(SMOOTH_FRACTION * len(logs)))
    prefix = [0.0]
    for value in logs:
        prefix.append(prefix[-1] + value)
    smoothed = []
    for i in range(len(logs)):
        low, high = max(0, i - half), min(len(logs), i + half + 1)
        smoothed.append((prefix[high] - prefix[low]) / (high - low))
    return smoothed


class Suggestion(NamedTuple):
    """A suggested peak LR and the sentence that says where on the curve it came from."""

    lr: float
    reason: str
    at_end: bool = False
    """The loss was lowest at the end of the range, with no divergence: the test stopped before
    the loss turned up, so the suggestion may be low (a wider range would tell)."""


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion | None:
    """The peak LR a range test's ``(lrs[i], losses[i])`` curve suggests (see the module), or
    ``None`` when it cannot tell: fewer than ``MIN_POINTS`` finite points before the first
    non-finite loss, a loss <= 0, or a curve that neither fell by ``MIN_DROP`` nor diverged."""
    if len(lrs) != len(losses):
        raise ValueError(
            f"lrs and losses must have one entry per step, got {len(lrs)} lrs, {len(losses)} losses"
        )
    finite = 0
    while finite < len(losses) and math.isfinite(losses[finite]) and math.isfinite(lrs[finite]):
        finite += 1
    lrs, losses = lrs[:finite], losses[:finite]
    if finite < MIN_POINTS or min(losses) <= 0 or min(lrs) <= 0:
        return None
    smoothed = smooth_log(losses)
    lowest, diverged = math.inf, None
    for i, value in enumerate(smoothed):
        if value > lowest + math.log(DIVERGENCE):
            diverged = i
            break
        lowest = min(lowest, value)
    before = smoothed[:diverged]
    best = min(range(len(before)), key=before.__getitem__)
    half = max(1, round(SMOOTH_FRACTION * finite))
    start = smoothed[half]  # the first full window
    # the scatter of one step's log loss around the curve (robust: median absolute deviation)
    pairs = zip(losses[: len(before)], before, strict=True)
    residuals = sorted(abs(math.log(loss) - value) for loss, value in pairs)
    scatter = 1.4826 * residuals[len(residuals) // 2]
    # a drop counts when it is MIN_DROP and NOISE_Z times the noise of a difference of two
    # smoothed points: the lowest of many noisy points is always somewhat below the start
    noise = NOISE_Z * scatter * math.sqrt(2.0 / (2 * half + 1))
    if start - before[best] >= max(-math.log(1.0 - MIN_DROP), noise):
        at_end = diverged is None and best >= finite - 1 - half
        return Suggestion(
            lrs[best] / FACTOR,
            f"the smoothed loss was lowest ({math.exp(before[best]):.4g}, from "
            f"{math.exp(start):.4g}) at LR {lrs[best]:.3g}; a {FACTOR:g}th of that"
            + ("; it was still falling where the range ended" if at_end else ""),
            at_end,
        )
    if diverged is None:
        return None
    return Suggestion(
        lrs[diverged] / FACTOR,
        f"the smoothed loss fell less than {MIN_DROP:.0%} and doubled from its lowest at LR "
        f"{lrs[diverged]:.3g}; a {FACTOR:g}th of that",
    )
