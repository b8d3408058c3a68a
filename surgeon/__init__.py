"""surgeon: an adaptive learning-rate controller for PyTorch Lightning.

``ScheduleSurgeon`` is the Lightning callback; :class:`Controller` is the
framework-free phase machine it drives; :mod:`surgeon.schedules` holds the pure
schedule functions underneath.
"""

from surgeon.callback import ScheduleSurgeon
from surgeon.config import SurgeonConfig
from surgeon.controller import Controller, Event, EventKind, Phase

__all__ = ["Controller", "Event", "EventKind", "Phase", "ScheduleSurgeon", "SurgeonConfig"]
__version__ = "0.1.0"
