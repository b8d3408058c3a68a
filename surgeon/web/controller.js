// Port of surgeon/controller.py: the phase machine, its interventions and snapshot
// bookkeeping, method for method with the same names, so that a change there is a mechanical
// change here (tests/test_web_port.py runs both on the same streams). Not ported: the
// checkpoint state (state_dict, load_state_dict, _replan) and lr_for: a replay never resumes.
(function (S) {
  "use strict";
  const { schedules } = S;
  const { resolve_steps } = S.config;
  const { Signal, PlateauDetector, SpikeDetector, StabilizationDetector } = S.detectors;
  const { f, g, percent, str, steps } = S.format;

  const NORMAL_BAND_ZSCORE = 3.0;
  const _MIN_STABILIZE_WINDOW = 10;
  const _MIN_PLATEAU_PATIENCE = 10; // a shorter stall is noise
  const _MIN_SNAPSHOT_EVERY = 10;
  const _MIN_PEAK = 1e-12;

  // format(x, "+.2%"): the sign always shown
  function signed_percent(x) {
    return (x < 0 || Object.is(x, -0) ? "" : "+") + percent(x, 2);
  }

  // the ratio tests' threshold in words: loss - mean >= (factor - 1) |mean| is factor x a
  // positive mean, and factor - 1 times the size of a mean <= 0 above it
  function _ratio_words(factor, mean, of) {
    return mean > 0 ? `${g(factor)}x ${of}` : `${g(factor - 1)}x |mean| above ${of}`;
  }

  function _format_bytes(nbytes) {
    for (const [unit, size] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
      if (nbytes >= size) return `${f(nbytes / size, 1)} ${unit}`;
    }
    return `${nbytes} bytes`;
  }

  const Phase = Object.freeze({
    WARMUP: "warmup",
    STABLE: "stable",
    DECAY: "decay",
    DONE: "done",
  });

  const EventKind = Object.freeze({
    WARMUP_END: "warmup_end",
    PLATEAU: "plateau",
    RESTART: "restart",
    SPIKE: "spike",
    NONFINITE: "nonfinite",
    RECOVERED: "recovered",
    SKIPPED_STEP: "skipped_step",
    ROLLBACK: "rollback",
    DECAY_START: "decay_start",
    DONE: "done",
    REPLAN: "replan",
    COOLDOWN: "cooldown",
    STOPPED: "stopped",
    PEAK_LR: "peak_lr",
    BUFFERS_RESTORED: "buffers_restored",
    STALLED: "stalled",
    RAMP_PAUSE: "ramp_pause",
    RAMP_RESUME: "ramp_resume",
    CLIMB: "climb",
    OUTLIER: "outlier",
  });

  function Event(step, kind, reason, scale_before, scale_after, phase = null) {
    return { step, kind, reason, scale_before, scale_after, phase };
  }

  class _Plan {
    constructor(start, v0, v1, ramp, hold, decay, shape) {
      Object.assign(this, { start, v0, v1, ramp, hold, decay, shape });
    }

    build(floor) {
      const pieces = this.ramp ? [schedules.linear(this.v0, this.v1, this.ramp)] : [];
      if (this.hold === null) {
        return _join([...pieces, schedules.constant(this.v1)], pieces.length ? [this.ramp] : []);
      }
      if (this.hold) pieces.push(schedules.constant(this.v1));
      pieces.push(
        schedules.decay_shape(this.shape, this.v1, Math.min(floor, this.v1), this.decay),
      );
      const bounds = this.ramp ? [this.ramp] : [];
      if (this.hold) bounds.push(this.ramp + this.hold);
      return _join(pieces, bounds);
    }
  }

  function _join(pieces, bounds) {
    return pieces.length === 1 ? pieces[0] : schedules.join(pieces, bounds);
  }

  class _Intervention {
    constructor({ mode = "normal", value = 1.0, hold_until = 0, recover_start = 0,
                  recover_steps = 1, lowered = false, answered = Infinity } = {}) {
      // lowered: this hold has lowered the peak already (a storm of spikes lowers it once);
      // answered: the worst loss its last cut answered (4x above it: an exploding loss)
      Object.assign(
        this, { mode, value, hold_until, recover_start, recover_steps, lowered, answered });
    }

    at(step) {
      if (this.mode === "hold") return this.value;
      if (this.mode === "recover") {
        const progress = Math.min(1.0, Math.max(0, step - this.recover_start) / this.recover_steps);
        return this.value + (1.0 - this.value) * progress;
      }
      return 1.0;
    }
  }

  class Controller {
    constructor(total_steps, config, lag = 0) {
      const cfg = (this.config = config);
      this.total_steps = total_steps;
      this.lag = lag;
      this.written_until = 0; // the first step whose LR the caller has not written yet
      this.floor = cfg.min_lr_ratio;
      if (cfg.warmup === "auto") {
        this.min_warmup = resolve_steps("min_warmup", cfg.min_warmup, total_steps);
        this.max_warmup = resolve_steps("max_warmup", cfg.max_warmup, total_steps);
      } else {
        this.min_warmup = this.max_warmup = resolve_steps("warmup", cfg.warmup, total_steps);
      }
      const names = cfg.warmup === "auto" ? ["min_warmup", "max_warmup"] : ["warmup", "warmup"];
      for (const [name, value] of [[names[0], this.min_warmup], [names[1], this.max_warmup]]) {
        if (value > total_steps) {
          throw new Error(
            `${name} must be <= total_steps, got ${name}=${value} steps, ` +
              `total_steps=${total_steps}`,
          );
        }
      }
      if (this.min_warmup > this.max_warmup) {
        throw new Error(
          "min_warmup must be <= max_warmup, got " +
            `min_warmup=${this.min_warmup} steps, max_warmup=${this.max_warmup} steps`,
        );
      }
      this.spike_cooldown = resolve_steps("spike_cooldown", cfg.spike_cooldown, total_steps, 1);
      this.spike_recovery = resolve_steps("spike_recovery", cfg.spike_recovery, total_steps, 1);
      this.restart_warmup = resolve_steps("restart_warmup", cfg.restart_warmup, total_steps, 1);
      this.stabilizer = new StabilizationDetector(
        resolve_steps("stabilize_window", cfg.stabilize_window, total_steps, _MIN_STABILIZE_WINDOW),
        cfg.stabilize_threshold,
        cfg.stabilize_patience,
      );
      this.plateau = new PlateauDetector(
        resolve_steps("plateau_patience", cfg.plateau_patience, total_steps, _MIN_PLATEAU_PATIENCE),
        cfg.plateau_min_delta,
        resolve_steps("plateau_cooldown", cfg.plateau_cooldown, total_steps),
      );
      this.spike = new SpikeDetector(cfg.spike_zscore, cfg.spike_ratio);
      this.snapshot_every = resolve_steps(
        "snapshot_every", cfg.snapshot_every, total_steps, Math.max(_MIN_SNAPSHOT_EVERY, lag),
      );
      this.max_undone_steps = 2 * this.snapshot_every + lag;
      this.reset();
    }

    // ---------------------------------------------------------------- state
    reset() {
      this.step = 0;
      this.phase = Phase.WARMUP;
      this.events = [];
      this.restarts = 0;
      this.paused = false;
      this.peak = 1.0;
      this.watch_until = 0;
      this.nonfinite_streak = 0;
      this.nonfinite_applied = false;
      this.ignore_until = 0;
      this.rolled_back_to = null;
      this.shifted_level = null; // the level a spike after that rollback shifted to (once)
      this.stalled = false;
      this._no_rollback = "";
      this.suspect = null; // a spike waiting for the next loss to confirm it
      this.intervention = new _Intervention();
      this.forget_snapshots();
      for (const detector of [this.stabilizer, this.plateau, this.spike]) detector.reset();
      if (this.max_warmup === 0) {
        this._set_plan(this._decay_plan(0, 1.0));
        this.phase = this._plan_phase(0);
      } else {
        const ramp = this.max_warmup;
        this._set_plan(this._warmup_plan(0, 1.0 / (ramp + 1), ramp));
      }
    }

    // ---------------------------------------------------------------- LR
    _level(step) {
      // the plan's base curve at `step`; a plan that starts later is at its start until then
      return this._base(Math.max(0, step - this._plan.start));
    }

    lr_scale(step) {
      let scale = this._level(step);
      if (this.intervention.mode !== "normal") scale *= this.intervention.at(step);
      return this.phase === Phase.WARMUP ? scale : Math.max(this.floor, scale);
    }

    // ---------------------------------------------------------------- decisions
    update(loss, { update_skipped = false } = {}) {
      const step = this.step;
      this.step += 1;
      if (step < this.ignore_until) return this._close_step(step, []);
      let new_events = [];
      this._expire_recovery(step);

      const mean = this.spike.mean;
      const std = this.spike.std;
      let signal;
      let bad;
      if (update_skipped && Number.isFinite(loss)) {
        signal = Signal.NONFINITE;
        bad = `gradients are non-finite (loss ${g(loss, 4)}); `;
      } else {
        signal = this.spike.update(loss);
        bad = `loss is ${str(loss)}; `;
      }
      const suspect = this.suspect;
      this.suspect = null;
      if (suspect !== null) {
        // the loss after a spike decides what the spike was
        if (signal === Signal.NONFINITE || this.spike.last_zscore > NORMAL_BAND_ZSCORE) {
          const nonfinite = signal === Signal.NONFINITE;
          new_events.push(this._confirm_spike(step, suspect, loss, nonfinite));
          if (!nonfinite) return this._close_step(step, new_events);
        } else {
          new_events.push(this._dismiss_spike(step, suspect, loss));
        }
      }
      if (signal === Signal.NONFINITE) {
        this.nonfinite_streak += 1;
        this.nonfinite_applied = this.nonfinite_applied || !update_skipped;
        const streak = this.nonfinite_streak;
        const needed = this.config.rollback_nonfinite;
        if (streak === needed) {
          const why = `${steps(streak, "non-finite ")} in a row (rollback_nonfinite=${needed})`;
          bad += this._request_rollback(step, why);
        }
        new_events.push(this._cut_for_spike(step, EventKind.NONFINITE, bad));
        if (update_skipped) {
          const why = `the optimizer update of step ${step} was not applied: ${bad.split(";")[0]}`;
          new_events.push(this._event(step, EventKind.SKIPPED_STEP, why, null));
        }
        if (streak >= 2 * this.snapshot_every && !this.stalled && this.rollback_to === null) {
          new_events.push(this._stall(step, loss, update_skipped));
        }
      } else if (signal === Signal.SPIKE) {
        // acted on once the next loss confirms it
        this.nonfinite_streak = 0;
        this.nonfinite_applied = false;
        this.suspect = { step, loss, mean, std, z: this.spike.last_zscore };
      } else {
        this.nonfinite_streak = 0;
        this.nonfinite_applied = false;
        if (this.spike.last_zscore <= NORMAL_BAND_ZSCORE) {
          this.rolled_back_to = null;
          this.shifted_level = null;
        }
        this._settle_snapshot(step);
        if (this.intervention.mode === "hold") {
          new_events = new_events.concat(this._maybe_recover(step, loss));
        }
        if (this.phase === Phase.WARMUP) {
          new_events = new_events.concat(this._warmup_update(step, loss));
        } else if (
          (this.phase === Phase.STABLE || this.phase === Phase.DECAY) &&
          this.intervention.mode === "normal"
        ) {
          const climb = this._climb_update(step, loss);
          new_events = new_events.concat(climb.length ? climb : this._plateau_update(step, loss));
        }
      }
      return this._close_step(step, new_events);
    }

    pass_step(applied = true) {
      const step = this.step;
      this.step += 1;
      this._expire_recovery(step);
      const pending = this._pending_snapshot;
      if (!applied) {
        this._idle_since_good += 1; // undoing it undoes nothing: not in a rollback's reach
        if (pending !== null && pending[0] === step) this._pending_snapshot = [step + 1, pending[1]];
      }
      return this._close_step(step, []);
    }

    _expire_recovery(step) {
      if (this.intervention.mode === "recover" && this.intervention.at(step + 1) >= 1.0) {
        this.intervention = new _Intervention();
        this.watch_until = step + 1 + this.spike_cooldown + this.spike_recovery;
      }
    }

    _close_step(step, new_events) {
      const pending = this._pending_snapshot;
      if (pending !== null && pending[0] === step) this._pending_snapshot = null;
      if (this.phase === Phase.WARMUP) new_events = new_events.concat(this._warmup_clock(step));
      this._follow_plan(step, new_events);
      if (new_events.length) {
        new_events = new_events.map((event) => ({ ...event, phase: this.phase }));
        this.events.push(...new_events);
      }
      return new_events;
    }

    _plan_phase(step) {
      const plan = this._plan;
      if (plan.hold === null || step - plan.start < plan.ramp + plan.hold) return Phase.STABLE;
      return Phase.DECAY;
    }

    _follow_plan(step, new_events) {
      if (this.phase === Phase.WARMUP || this.phase === Phase.DONE) return;
      if (this.step >= this.total_steps) {
        this.phase = Phase.DONE;
        const why =
          `planned length of ${this.total_steps} steps reached; the LR stays at the floor ` +
          `(${g(this.floor)} of the peak) from here`;
        new_events.push(this._event(step, EventKind.DONE, why, null));
        return;
      }
      const phase = this._plan_phase(step + 1);
      if (phase === Phase.DECAY && this.phase === Phase.STABLE) {
        const plan = this._plan;
        const level = this._level(step + 1);
        const what = plan.hold ? "the hold ends" : "the ramp reached its top";
        const why =
          `${what}: ${plan.shape} decay from LR scale ${g(level, 3)} to the floor ` +
          `(${g(this.floor)}) over the last ${steps(plan.decay)}`;
        new_events.push(this._event(step, EventKind.DECAY_START, why, null));
      }
      this.phase = phase;
    }

    // ---------------------------------------------------------------- snapshots and rollback
    forget_snapshots(why = "no good snapshot yet") {
      this._no_snapshot_why = why;
      this._pending_snapshot = null;
      this._good_snapshot = null;
      this._idle_since_good = 0; // steps passed without an update since the good snapshot
      this._unsettled = null; // [step, cause] of the last spike answered by a cut
      this._last_snapshot_step = -Infinity;
      this.rollback_to = null;
      this._rollback_cause = [0, ""];
    }

    snapshots_off() {
      this.forget_snapshots("snapshots are off (snapshot='off', or a Surgeon without model=)");
    }

    checkpoint_dropped_snapshots(step) {
      this.forget_snapshots(
        `no good snapshot: the checkpoint at step ${step} dropped the snapshots ` +
          "(a resumed run has none, so both go on alike) and none taken since is confirmed yet " +
          "(one is once the loss of its own step is read and normal), so trouble this close " +
          "after a checkpoint cannot be rolled back; checkpoint less often to leave fewer such " +
          "steps",
      );
    }

    get good_snapshot_step() {
      return this._good_snapshot === null ? null : this._good_snapshot[0];
    }

    snapshot_due(step) {
      return (
        this._pending_snapshot === null &&
        this.rollback_to === null &&
        step - this._last_snapshot_step >= this.snapshot_every &&
        step >= this.ignore_until
      );
    }

    snapshot_taken(step, nbytes) {
      this._pending_snapshot = [step, nbytes];
      this._last_snapshot_step = step;
    }

    before_checkpoint(end_of_fit = false) {
      // every loss is read and a checkpoint or the end of the fit is next: a
      // severe spike no loss will confirm, or applied non-finite updates, roll back now
      const suspect = this.suspect;
      if (suspect !== null && !this.nonfinite_streak) {
        const threshold = this.config.rollback_threshold;
        if (this._severe(suspect.loss, suspect.mean)) {
          this._request_rollback(
            suspect.step,
            `${this._spike_words(suspect)} just before a checkpoint or the end of the ` +
              "fit, unconfirmed; at least " +
              `${_ratio_words(threshold, suspect.mean, "its running mean")} ` +
              `(rollback_threshold=${g(threshold)})`,
          );
        }
      }
      if (this.nonfinite_streak && this.nonfinite_applied) {
        const streak = this.nonfinite_streak;
        this._request_rollback(
          this.step - 1,
          `${streak} non-finite step(s) with their updates applied just before a checkpoint ` +
            "or the end of the fit",
        );
      }
      if (end_of_fit || this.step >= this.total_steps) this._settle_at_the_end();
    }

    _settle_at_the_end() {
      // at the end of the fit no step is left for the cut that answered a confirmed spike
      // since the good snapshot: with the loss still out of its band, roll back to it (an
      // outlier back in band is left alone: rolling back undoes the decay's last steps)
      const unsettled = this._unsettled;
      const good = this._good_snapshot;
      if (unsettled === null || good === null || unsettled[0] < good[0]) return;
      if (this.spike.last_zscore <= NORMAL_BAND_ZSCORE) return;
      const [step, cause] = unsettled;
      this._request_rollback(
        step,
        `${cause} just before the end of the fit, its loss still out of its band, no step ` +
          "left for the cut to act",
      );
    }

    _settle_snapshot(step) {
      const pending = this._pending_snapshot;
      if (pending !== null && pending[0] === step &&
          this.spike.last_zscore <= NORMAL_BAND_ZSCORE) {
        this._good_snapshot = pending;
        this._pending_snapshot = null;
        this._idle_since_good = 0;
      }
    }

    _request_rollback(step, cause) {
      if (this.rollback_to !== null) return "";
      const good = this._good_snapshot;
      let why;
      if (this.rolled_back_to !== null) {
        why =
          `the loss has not been normal since the rollback to step ${this.rolled_back_to}, ` +
          "so going back again would repeat it";
      } else if (good === null) {
        why = this._no_snapshot_why;
      } else if (step - good[0] - this._idle_since_good > 2 * this.snapshot_every) {
        const idle = this._idle_since_good;
        const updated = idle ? ` (${step - good[0] - idle} with an update)` : "";
        why =
          `the last good snapshot (step ${good[0]}) is ${steps(step - good[0])} back` +
          `${updated}, more than two snapshot intervals (${2 * this.snapshot_every} steps)`;
      } else {
        this.rollback_to = good[0];
        this._rollback_cause = [step, cause];
        return "";
      }
      this._no_rollback = why;
      return `${cause}, but no rollback: ${why}; `;
    }

    _stall(step, loss, update_skipped) {
      this.stalled = true;
      const streak = this.nonfinite_streak;
      const what = update_skipped ? "updates skipped" : "updates applied";
      const why =
        `${steps(streak, "non-finite ")} in a row (steps ${step - streak + 1} to ${step}, last loss ` +
        `${str(loss)}, ${what}) and nothing to roll back to ` +
        `(${this._no_rollback || "no snapshot"}): the run cannot make progress; stopping it`;
      return this._event(step, EventKind.STALLED, why, null);
    }

    rolled_back(now) {
      if (this.rollback_to === null || this._good_snapshot === null) {
        throw new Error("rolled_back() without a rollback decision (rollback_to is None)");
      }
      const [target, nbytes] = this._good_snapshot;
      const [step, cause] = this._rollback_cause;
      this.rollback_to = null;
      this.suspect = null;
      this._pending_snapshot = null;
      this.ignore_until = Math.max(this.ignore_until, now);
      this.nonfinite_streak = 0;
      this.nonfinite_applied = false;
      this.rolled_back_to = target;
      this.shifted_level = null;
      this._unsettled = null;
      const idle = this._idle_since_good; // (steps not read yet count as updated)
      const updated = idle ? `, ${now - target - idle} with an update` : "";
      const why =
        `${cause}: restored the snapshot of step ${target} (${_format_bytes(nbytes)}), ` +
        `undoing the updates of steps ${target} to ${now - 1} (${steps(now - target)}${updated})`;
      const scale = this.lr_scale(now);
      const event = Event(step, EventKind.ROLLBACK, why, scale, scale, this.phase);
      this.events.push(event);
      return event;
    }

    // ---------------------------------------------------------------- warmup
    _warmup_update(step, loss) {
      const signal = this.stabilizer.update(loss);
      if (this.config.warmup !== "auto" || this.intervention.mode !== "normal") return [];
      const det = this.stabilizer;
      const trend =
        `its EMA changed by ${signed_percent(-(det.last_drop || 0.0))} over the last ` +
        `${det.window} steps (noise ${percent(det.last_noise, 2)}, threshold ` +
        `${percent(det.threshold, 2)})`;
      if (signal === Signal.RISING) {
        if (this.paused) return [];
        const before = this.lr_scale(step + 1);
        const level = this._level(step + 1);
        this.paused = true;
        this._set_plan(new _Plan(step + 1, level, level, 0, null, 0, "linear"));
        const where = level >= this.peak ? "at the peak" : `at LR scale ${g(level, 3)}`;
        const why = `the loss is rising: ${trend}; the warmup ramp holds ${where}`;
        return [this._event(step, EventKind.RAMP_PAUSE, why, before)];
      }
      if (this.paused) {
        if ((det.last_drop || 0.0) < 0.0) return [];
        const before = this.lr_scale(step + 1);
        const level = this._level(step + 1);
        this.paused = false;
        const ramp = this._ramp_steps(level, this.max_warmup);
        this._set_plan(this._warmup_plan(step + 1, level, ramp));
        const why =
          `the loss is back down: ${trend}; the ramp goes on from LR scale ${g(level, 3)} ` +
          `to ${g(this.peak, 3)} over ${steps(ramp)}`;
        return [this._event(step, EventKind.RAMP_RESUME, why, before)];
      }
      if (signal === Signal.STABILIZED && step + 1 >= this.min_warmup) {
        const why =
          `the loss stabilized after its initial descent: ${trend}, not steeper and not ` +
          `rising for ${steps(det.patience)} in a row`;
        return [this._end_warmup(step, why)];
      }
      return [];
    }

    _ramp_steps(level, pace) {
      return Math.ceil(Math.max(0.0, this.peak - level) * pace);
    }

    _warmup_clock(step) {
      const plan = this._plan;
      const det = this.stabilizer;
      let why;
      if (plan.hold !== null && step + 1 - plan.start >= plan.ramp) {
        if (this.config.warmup !== "auto") {
          why = `fixed warmup of ${steps(this.max_warmup)} finished`;
        } else {
          const measured =
            det.last_drop === null
              ? `fewer than ${det.window + 1} losses to measure its trend by`
              : `last EMA drop ${percent(det.last_drop, 2)} per ${det.window} steps, noise ` +
                `${percent(det.last_noise, 2)}`;
          why =
            `the ramp reached the peak at the pace of a ${this.max_warmup}-step ramp ` +
            `(max_warmup) before the loss stabilized (${measured})`;
        }
        return [this._end_warmup(step, why)];
      }
      if (step + 1 < this.max_warmup) return [];
      const level = this._level(step + 1);
      if (this.paused && this.intervention.mode === "normal") {
        // held by a rising loss
        if (level < this.peak) {
          this.peak = level;
          why =
            `max_warmup=${steps(this.max_warmup)} reached while the loss was rising: the peak ` +
            `is lowered to LR scale ${g(this.peak, 3)}, the highest the loss took`;
        } else {
          // held at the peak itself
          why =
            `max_warmup=${steps(this.max_warmup)} reached while the loss was rising, at the ` +
            "peak already";
        }
      } else {
        why =
          `max_warmup=${steps(this.max_warmup)} reached at LR scale ${g(level, 3)} (the ramp was ` +
          `held on the way); it finishes at the pace of a ${this.min_warmup}-step ramp`;
      }
      return [this._end_warmup(step, why)];
    }

    _end_warmup(step, why) {
      const before = this.lr_scale(step + 1);
      const plan = this._plan;
      let start = step + 1;
      if (plan.hold !== null && plan.ramp > start - plan.start) {
        start = Math.min(this._first_reached(step), plan.start + plan.ramp);
      }
      const level = this._level(start);
      this.paused = false;
      const ramp = this._ramp_steps(level, this.min_warmup);
      if (ramp) {
        this._set_plan(this._decay_plan(start, this.peak, { v0: level, ramp }));
        why += `; the LR goes from scale ${g(level, 3)} to the peak over ${steps(ramp)}`;
      } else {
        this._set_plan(this._decay_plan(start, Math.min(level, this.peak), {}));
      }
      this.phase = this._plan_phase(step + 1);
      this.plateau.reset();
      return this._event(step, EventKind.WARMUP_END, why, before);
    }

    _warmup_plan(start, v0, ramp) {
      const holds = this.config.warmup === "auto" && this.config.decay !== "wsd";
      const latest = holds ? this._latest_decay_start(start + ramp) : null;
      return this._decay_plan(start, this.peak, { v0, ramp, decay_start: latest });
    }

    _latest_decay_start(start) {
      return this.total_steps -
        S.config.py_round(this.config.wsd_decay_fraction * (this.total_steps - start));
    }

    // ---------------------------------------------------------------- after warmup
    _climb_update(step, loss) {
      const det = this.stabilizer;
      if (det.update(loss) !== Signal.RISING || det.rise_run < det.patience) return [];
      const ratio = this.config.spike_ratio;
      if (det.ema - det.rise_base <= (ratio - 1.0) * Math.abs(det.rise_base)) return [];
      const run = det.rise_run;
      const base = det.rise_base;
      det.restart_rise();
      const before = this.lr_scale(step + 1);
      this._lower_peak(step, this._level(step + 1) * this.config.spike_factor);
      this.plateau.reset();
      const why =
        `the loss kept rising: its EMA went from ${g(base, 4)} to ${g(det.ema, 4)} ` +
        `(more than ${g(ratio)}x), rising beyond its noise (${percent(det.last_noise, 2)} per ` +
        `${det.window} steps) for ${steps(run)} in a row; the peak is lowered x` +
        `${g(this.config.spike_factor)} to LR scale ${g(this.peak, 3)} for the rest of the run`;
      return [this._event(step, EventKind.CLIMB, why, before)];
    }

    _plateau_update(step, loss) {
      if (this.plateau.update(loss) !== Signal.PLATEAU) return [];
      const cfg = this.config;
      const det = this.plateau;
      const restart = cfg.plateau_action === "restart" && this.restarts < cfg.max_restarts;
      if (!restart && this.phase !== Phase.STABLE) return [];
      const before = this.lr_scale(step + 1);
      const current = this._level(step + 1);
      const stalled =
        `the smoothed loss (EMA ${g(det.ema, 4)}) has not improved by ` +
        `${percent(det.min_delta, 2)} on its best ${g(det.best, 4)} for ${det.patience} steps; `;
      if (restart) {
        this.restarts += 1;
        const target = cfg.restart_peak * this.peak;
        this._set_plan(
          this._decay_plan(step + 1, target, { v0: current, ramp: this.restart_warmup }),
        );
        const why =
          `${stalled}restart ${this.restarts}/${cfg.max_restarts}: re-warm from ` +
          `${g(current, 3)} to ${g(target, 3)} (${g(cfg.restart_peak)} of the peak) ` +
          `over ${steps(this.restart_warmup)}`;
        return [this._event(step, EventKind.RESTART, why, before)];
      }
      const cut = Math.max(this.floor, current * cfg.plateau_factor);
      if (cut >= current) return [];
      this._set_plan(this._decay_plan(step + 1, cut));
      const why =
        `${stalled}LR scale cut x${g(cfg.plateau_factor)} from ${g(current, 3)} to ${g(cut, 3)}`;
      return [this._event(step, EventKind.PLATEAU, why, before)];
    }

    // ---------------------------------------------------------------- interventions
    _spike_words(suspect) {
      return (
        `loss ${g(suspect.loss, 4)} at step ${suspect.step} is ` +
        `${Math.abs(suspect.z) < 1e6 ? f(suspect.z, 1) : g(suspect.z, 3)} ` +
        `sigma above its running mean ${g(suspect.mean, 4)} (noise ${g(suspect.std, 3)}; ` +
        `thresholds ${g(this.spike.zscore)} sigma and ` +
        `${_ratio_words(this.spike.ratio, suspect.mean, "the mean")})`
      );
    }

    _confirm_spike(step, suspect, loss, nonfinite) {
      // the loss after a spike is still out of its band (or non-finite, or its gradients are):
      // cut, maybe roll back
      this.nonfinite_streak = 0;
      this.nonfinite_applied = false;
      const mean = suspect.mean;
      const worst = Number.isFinite(loss) ? Math.max(suspect.loss, loss) : suspect.loss;
      let still;
      if (!Number.isFinite(loss)) still = "is not finite";
      else if (nonfinite) still = "has non-finite gradients";
      else still = `is still ${f(this.spike.last_zscore, 1)} sigma above it`;
      let why = `${this._spike_words(suspect)}, and the next loss, ${g(loss, 4)}, ${still}; `;
      const threshold = this.config.rollback_threshold;
      const level_shift = this.rolled_back_to !== null && this.shifted_level === null;
      if (level_shift) {
        const level = Number.isFinite(loss) ? loss : suspect.loss;
        this.spike.rebase(level);
        this.shifted_level = level;
        why +=
          `the loss has stayed up since the rollback to step ${this.rolled_back_to}: a ` +
          `lasting level shift, not damage; ${g(level, 4)} is the new running mean (no ` +
          "further rollback); ";
      } else if (this.rolled_back_to !== null) {
        why +=
          "the loss rose again past the level it shifted to after the rollback to step " +
          `${this.rolled_back_to} (${g(this.shifted_level, 4)}): instability at this LR, ` +
          "not another level shift (no further rollback); ";
      } else if (this._severe(worst, mean)) {
        why += this._request_rollback(
          step,
          `loss ${g(worst, 4)} is at least ` +
            `${_ratio_words(threshold, mean, "its running mean")} ${g(mean, 4)} ` +
            `(rollback_threshold=${g(threshold)})`,
        );
      } else if (!Number.isFinite(loss)) {
        why += this._request_rollback(step, `the next loss, ${str(loss)}, is not finite`);
      }
      if (this.rollback_to === null) {
        this._unsettled = [suspect.step, `a spike at step ${suspect.step}`];
      }
      return this._cut_for_spike(step, EventKind.SPIKE, why, level_shift, worst);
    }

    _severe(loss, mean) {
      // loss at least rollback_threshold x the running mean: damage a rollback undoes
      return loss - mean >= (this.config.rollback_threshold - 1.0) * Math.abs(mean);
    }

    _dismiss_spike(step, suspect, loss) {
      // the loss after a spike is back in its normal band: one hard batch, no action; a
      // snapshot taken after it holds its update: no rollback target
      const pending = this._pending_snapshot;
      if (pending !== null && pending[0] > suspect.step) this._pending_snapshot = null;
      const why =
        `${this._spike_words(suspect)}, but the next loss, ${g(loss, 4)}, is back within ` +
        `${g(NORMAL_BAND_ZSCORE)} sigma: an isolated outlier (a hard batch), no action`;
      return this._event(step, EventKind.OUTLIER, why, this.lr_scale(step + 1));
    }

    _first_reached(step) {
      // the first step whose LR a decision on step's loss reaches: the next one, or the first
      // the caller has not written yet (it wrote those before written_until)
      return Math.max(step + 1, this.written_until);
    }

    _cut_for_spike(step, kind, why, level_shift = false, worst = Infinity) {
      const before = this.lr_scale(step + 1);
      const hold_until = this._first_reached(step) + this.spike_cooldown;
      if (this.intervention.mode === "hold") {
        this.intervention.hold_until = hold_until;
        const storm = kind === EventKind.SPIKE && !level_shift;
        if (storm && !this.intervention.lowered) {
          // a second confirmed spike while the LR is still cut: the LR before the cut is too
          // high for this run (not a level shift: those follow a rollback); once per hold
          this.intervention.lowered = true;
          this._lower_peak(step, this._level(step + 1) * this.config.spike_factor);
          why +=
            `a second spike while the LR is cut: the peak is lowered to ${g(this.peak, 3)} ` +
            "for the rest of the run; ";
        }
        const answered = this.intervention.answered;
        const exploding = Number.isFinite(worst) && Number.isFinite(answered);
        if (exploding && !level_shift && this._severe(worst, answered)) {
          const value = Math.max(this.floor, this.intervention.value * this.config.spike_factor);
          why +=
            `loss ${g(worst, 4)} is at least ` +
            `${_ratio_words(this.config.rollback_threshold, answered, "the loss")} ` +
            `${g(answered, 4)} the cut answered: still exploding, LR multiplier cut again ` +
            `x${g(this.config.spike_factor)} to ${g(value, 3)}; `;
          this.intervention.value = value;
          this.intervention.answered = worst;
        }
        why += `already cut, cooldown extended to step ${hold_until}`;
        return this._event(step, kind, why, before);
      }
      let current = this.intervention.at(step + 1);
      const lowered = this.intervention.mode === "recover" || step < this.watch_until;
      if (lowered) {
        this._lower_peak(step, before * this.config.spike_factor);
        current = 1.0;
        why +=
          `the loss spiked again at LR scale ${g(before, 3)} within ` +
          `${this.spike_cooldown + this.spike_recovery} steps of the last cut: the peak is ` +
          `lowered to ${g(this.peak, 3)} for the rest of the run; `;
      }
      const value = Math.max(this.floor, current * this.config.spike_factor);
      this.intervention = new _Intervention({
        mode: "hold", value, hold_until, lowered, answered: worst });
      if (this.phase === Phase.WARMUP && !this.paused) {
        this.paused = true;
        const frozen = Math.min(this.peak, this._level(step + 1));
        this._set_plan(new _Plan(step + 1, frozen, frozen, 0, null, 0, "linear"));
        why += "warmup ramp paused; ";
      }
      why +=
        `LR multiplier cut x${g(this.config.spike_factor)} to ${g(value, 3)} from step ` +
        `${hold_until - this.spike_cooldown}, held for at least ${steps(this.spike_cooldown)}`;
      return this._event(step, kind, why, before);
    }

    _lower_peak(step, peak) {
      this.peak = Math.max(this.floor, Math.min(this.peak, peak), _MIN_PEAK);
      const level = this._level(step + 1);
      if (this.phase === Phase.WARMUP) {
        if (this.paused || level >= this.peak) {
          const held = Math.min(level, this.peak);
          this._set_plan(new _Plan(step + 1, held, held, 0, null, 0, "linear"));
          this.paused = true;
        } else {
          const ramp = this._ramp_steps(level, this.max_warmup);
          this._set_plan(this._warmup_plan(step + 1, level, ramp));
        }
      } else if (this.phase !== Phase.DONE && level > this.peak) {
        // a hold holds the lower peak; a decay under way goes on decaying, from it
        const decaying = this.phase === Phase.DECAY;
        this._set_plan(this._decay_plan(step + 1, this.peak, { tail_only: decaying }));
        this.phase = this._plan_phase(step + 1);
      }
    }

    _maybe_recover(step, loss) {
      const held = this.intervention;
      if (step + 1 < held.hold_until) return [];
      if (this.spike.last_zscore > NORMAL_BAND_ZSCORE) return [];
      const before = this.lr_scale(step + 1);
      this.plateau.reset();
      this.intervention = new _Intervention({
        mode: "recover",
        value: held.value,
        recover_start: this._first_reached(step),
        recover_steps: this.spike_recovery,
      });
      let why =
        `loss ${g(loss, 4)} is back within ${g(NORMAL_BAND_ZSCORE)} sigma of its running mean ` +
        `${g(this.spike.mean, 4)}; LR multiplier ramps from ${g(held.value, 3)} back to 1 over ` +
        `${steps(this.spike_recovery)} from step ${this.intervention.recover_start}`;
      if (this.paused) {
        this.paused = false;
        const current = this._level(step + 1);
        const ramp = this._ramp_steps(current, this.max_warmup);
        this._set_plan(this._warmup_plan(step + 1, current, ramp));
        why += "; warmup ramp resumed";
      }
      return [this._event(step, EventKind.RECOVERED, why, before)];
    }

    // ---------------------------------------------------------------- plans
    _decay_plan(start, v1, { v0 = null, ramp = 0, decay_start = null, tail_only = false } = {}) {
      const ramp_end = start + ramp;
      decay_start = decay_start === null ? ramp_end : Math.max(decay_start, ramp_end);
      const remaining = Math.max(0, this.total_steps - decay_start);
      let shape = this.config.decay;
      let stable = 0;
      if (shape === "wsd") {
        if (!tail_only) {
          stable = S.config.py_round(remaining * (1.0 - this.config.wsd_decay_fraction));
        }
        shape = "linear";
      }
      const hold = decay_start - ramp_end + stable;
      return new _Plan(start, v0 === null ? v1 : v0, v1, ramp, hold, remaining - stable, shape);
    }

    _set_plan(plan) {
      this._plan = plan;
      this._base = plan.build(this.floor);
    }

    _event(step, kind, why, before) {
      const after = this.lr_scale(step + 1);
      return Event(step, kind, why, before === null ? after : before, after);
    }
  }

  S.controller = { Controller, Event, EventKind, Phase, NORMAL_BAND_ZSCORE };
})((globalThis.surgeon ||= {}));
