"""surgeon: an adaptive learning-rate controller for PyTorch Lightning.

``ScheduleSurgeon`` is the Lightning callback, ``Surgeon`` the same for plain PyTorch and
Fabric loops; :class:`Controller` is the
framework-free phase machine it drives; :mod:`surgeon.schedules` holds the pure
schedule functions underneath. The callback (and so torch and Lightning) is
imported on first use, so ``surgeon.schedules``, ``surgeon.plot`` and the command line stay
light. The distribution is ``schedule-surgeon``; ``__version__`` is its one version number.
"""

from typing import TYPE_CHECKING, Any

from surgeon.config import SurgeonConfig
from surgeon.controller import Controller, Event, EventKind, Phase

if TYPE_CHECKING:
    from surgeon.callback import ScheduleSurgeon
    from surgeon.loop import Surgeon

__all__ = [
    "Controller",
    "Event",
    "EventKind",
    "Phase",
    "ScheduleSurgeon",
    "Surgeon",
    "SurgeonConfig",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "ScheduleSurgeon":
        from surgeon.callback import ScheduleSurgeon

        return ScheduleSurgeon
    if name == "Surgeon":
        from surgeon.loop import Surgeon

        return Surgeon
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
