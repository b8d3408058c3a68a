"""What a run leaves in its log directory beside the logger's metrics: file names and codes.

The callback writes these files and ``surgeon plot`` reads them; this module imports neither
torch nor Lightning, so the command line starts fast and reads any run without them.

* ``events.jsonl``: one JSON record per decision (``step``, ``kind``, ``reason``, the LR scale
  and the first param group's LR around it, and the ``phase`` the run is in after that
  step's decisions);
* ``lr_find.csv``: the LR range test's ``lr,loss`` curve, each step's loss (``peak_lr="find"``);
* ``settings.json``: the planned length and the configuration of the fit;
* ``losses.csv``: every step's loss as the controller saw it (``step,loss,update_skipped``).
"""

from surgeon.controller import Phase

EVENTS_FILE = "events.jsonl"
LR_FIND_FILE = "lr_find.csv"
"""The range test's ``lr,loss`` curve (``peak_lr="find"``), beside ``events.jsonl``."""
SETTINGS_FILE = "settings.json"
LOSSES_FILE = "losses.csv"
PHASE_CODES = {Phase.WARMUP: 0.0, Phase.STABLE: 1.0, Phase.DECAY: 2.0, Phase.DONE: 3.0}
"""Numeric phase logged as ``surgeon/phase`` (loggers take numbers)."""
