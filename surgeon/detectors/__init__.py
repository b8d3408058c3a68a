"""Loss-stream detectors: small stateful objects fed one float per optimizer step.

Each detector has ``update(loss) -> Signal | None``, ``reset()`` and
``state_dict()`` / ``load_state_dict()``; none imports torch or Lightning, so
each can be tested with a list of floats.
"""

from enum import Enum


class Signal(str, Enum):
    """What a detector reports about the loss it was just fed."""

    STABILIZED = "stabilized"
    RISING = "rising"
    PLATEAU = "plateau"
    SPIKE = "spike"
    NONFINITE = "nonfinite"


from surgeon.detectors.plateau import PlateauDetector  # noqa: E402
from surgeon.detectors.spike import SpikeDetector  # noqa: E402
from surgeon.detectors.stabilization import StabilizationDetector  # noqa: E402

__all__ = ["PlateauDetector", "Signal", "SpikeDetector", "StabilizationDetector"]
