"""The Lightning-specific parts of :class:`surgeon.callback.ScheduleSurgeon`, one concern each.

* :mod:`~surgeon._lightning.trainer`: what the Trainer says (its callbacks, scaler, counters,
  strategy, planned length) and the LR schedulers it is given, read once per fit;
* :mod:`~surgeon._lightning.reporting`: what users see (info lines, logger metrics at
  Lightning's cadence, ``callback_metrics`` and the progress bar, hyperparameters, run files);
* :mod:`~surgeon._lightning.budget`: fits that end before their plan (``max_time``, an
  ``EarlyStopping`` about to stop, an early end recorded);
* :mod:`~surgeon._lightning.range_test`: ``peak_lr="find"`` through Lightning's LR finder.

These and :mod:`surgeon.callback` are the only modules that import Lightning; the decisions
they wire up live in framework-free code (:mod:`surgeon.engine`, :mod:`surgeon.planning`).
"""
