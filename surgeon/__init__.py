"""surgeon: an adaptive learning-rate controller for PyTorch Lightning.

``ScheduleSurgeon`` is the Lightning callback, ``Surgeon`` the same for plain PyTorch and
Fabric loops; :class:`Controller` is the
framework-free phase machine it drives; :mod:`surgeon.schedules` holds the pure
schedule functions underneath. The callback (and so torch and Lightning) is
imported on first use, so ``surgeon.schedules``, ``surgeon.plot`` and the command line stay
light. The distribution is ``schedule-surgeon``; ``__version__`` is its one version number.
"""

import sys
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

_lightning_log: Any = None
"""Where Lightning's rank-zero console log pointed before the surgeon imported Lightning (one
pointer for both namespaces, set by whichever was imported last; ``None``: no Lightning was
imported yet). ``surgeon._lightning.trainer`` puts it back after importing both namespaces."""


def _remember_lightning_log() -> None:
    global _lightning_log
    rank_zero = sys.modules.get("lightning_utilities.core.rank_zero")
    if rank_zero is not None and "surgeon._lightning.trainer" not in sys.modules:
        _lightning_log = rank_zero.log


_remember_lightning_log()


def __getattr__(name: str) -> Any:
    if name == "ScheduleSurgeon":
        _remember_lightning_log()  # the project's Lightning import may have come after ours
        from surgeon.callback import ScheduleSurgeon

        return ScheduleSurgeon
    if name == "Surgeon":
        from surgeon.loop import Surgeon

        return Surgeon
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
