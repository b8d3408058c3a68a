// Port of surgeon/controller.py: the phase machine, its interventions and snapshot
// bookkeeping, method for method with the same names, so that a change there is a mechanical
// change here (tests/test_web_port.py runs both on the same streams). Not ported: the
// checkpoint state (state_dict, load_state_dict, _replan) and lr_for: a replay never resumes.
(function (S) {
  "use strict";
  const { schedules } = S;
  const { resolve_steps } = S.config;
  const { Signal, PlateauDetector, SpikeDetector, StabilizationDetector } = S.detectors;
  const { f, g, percent, str } = S.format;

  const NORMAL_BAND_ZSCORE = 3.0;
  const _MIN_STABILIZE_WINDOW = 10;
  const _MIN_SNAPSHOT_EVERY = 10;

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
    PEAK_LR: "peak_lr",
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
                  recover_steps = 1 } = {}) {
      Object.assign(this, { mode, value, hold_until, recover_start, recover_steps });
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
    constructor(total_steps, config) {
      const cfg = (this.config = config);
      this.total_steps = total_steps;
      this.floor = cfg.min_lr_ratio;
      if (cfg.warmup === "auto") {
        this.min_warmup = resolve_steps("min_warmup", cfg.min_warmup, total_steps);
        this.max_warmup = resolve_steps("max_warmup", cfg.max_warmup, total_steps);
      } else {
        this.min_warmup = this.max_warmup = cfg.warmup;
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
        resolve_steps("plateau_patience", cfg.plateau_patience, total_steps, 1),
        cfg.plateau_min_delta,
        resolve_steps("plateau_cooldown", cfg.plateau_cooldown, total_steps),
      );
      this.spike = new SpikeDetector(cfg.spike_zscore, cfg.spike_ratio);
      this.snapshot_every = resolve_steps(
        "snapshot_every", cfg.snapshot_every, total_steps, _MIN_SNAPSHOT_EVERY,
      );
      this.reset();
    }

    // ---------------------------------------------------------------- state
    reset() {
      this.step = 0;
      this.phase = Phase.WARMUP;
      this.events = [];
      this.restarts = 0;
      this.paused = false;
      this.nonfinite_streak = 0;
      this.ignore_until = 0;
      this.intervention = new _Intervention();
      this.forget_snapshots();
      for (const detector of [this.stabilizer, this.plateau, this.spike]) detector.reset();
      if (this.max_warmup === 0) {
        this._set_plan(this._decay_plan(0, 1.0));
        this.phase = this._plan_phase(0);
      } else {
        const ramp = this.min_warmup;
        this._set_plan(
          this._decay_plan(0, 1.0, { v0: 1.0 / (ramp + 1), ramp, decay_start: this.max_warmup }),
        );
      }
    }

    // ---------------------------------------------------------------- LR
    lr_scale(step) {
      let scale = this._base(Math.max(0, step - this._plan.start));
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
      const variance = this.spike.var;
      let signal;
      let bad;
      if (update_skipped && Number.isFinite(loss)) {
        signal = Signal.NONFINITE;
        bad = `gradients are non-finite (loss ${g(loss, 4)}); `;
      } else {
        signal = this.spike.update(loss);
        bad = `loss is ${str(loss)}; `;
      }
      if (signal === Signal.NONFINITE) {
        this.nonfinite_streak += 1;
        new_events.push(this._cut_for_spike(step, EventKind.NONFINITE, bad));
        if (update_skipped) {
          const why = `the optimizer update of step ${step} was not applied: ` +
            bad.replace(/[; ]+$/, "");
          new_events.push(this._event(step, EventKind.SKIPPED_STEP, why, null));
        }
        if (this.nonfinite_streak >= this.config.rollback_nonfinite) {
          this._request_rollback(
            step,
            `${this.nonfinite_streak} non-finite steps in a row (rollback_nonfinite=` +
              `${this.config.rollback_nonfinite})`,
          );
        }
      } else if (signal === Signal.SPIKE) {
        this.nonfinite_streak = 0;
        const why =
          `loss ${g(loss, 4)} is ${f(this.spike.last_zscore, 1)} sigma above its running mean ` +
          `${g(mean, 4)} (std ${g(Math.sqrt(variance), 3)}; thresholds ${g(this.spike.zscore)} ` +
          `sigma and ${g(this.spike.ratio)}x the mean); `;
        new_events.push(this._cut_for_spike(step, EventKind.SPIKE, why));
        const threshold = this.config.rollback_threshold;
        if (loss - mean >= (threshold - 1.0) * Math.abs(mean)) {
          this._request_rollback(
            step,
            `loss ${g(loss, 4)} is at least ${g(threshold)}x its running mean ${g(mean, 4)} ` +
              `(rollback_threshold=${g(threshold)})`,
          );
        }
      } else {
        this.nonfinite_streak = 0;
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
          new_events = new_events.concat(this._plateau_update(step, loss));
        }
      }
      return this._close_step(step, new_events);
    }

    pass_step() {
      const step = this.step;
      this.step += 1;
      this._expire_recovery(step);
      return this._close_step(step, []);
    }

    _expire_recovery(step) {
      if (this.intervention.mode === "recover" && this.intervention.at(step + 1) >= 1.0) {
        this.intervention = new _Intervention();
      }
    }

    _close_step(step, new_events) {
      const pending = this._pending_snapshot;
      if (pending !== null && pending[0] === step) this._pending_snapshot = null;
      if (this.phase === Phase.WARMUP && step + 1 >= this.max_warmup) {
        new_events.push(this._end_warmup(step, this._warmup_deadline_reason()));
      }
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
        const level = this._base(step + 1 - plan.start);
        const why =
          `the hold at LR scale ${g(level, 3)} ends: ${plan.shape} decay to the floor ` +
          `(${g(this.floor)}) over the last ${plan.decay} steps`;
        new_events.push(this._event(step, EventKind.DECAY_START, why, null));
      }
      this.phase = phase;
    }

    // ---------------------------------------------------------------- snapshots and rollback
    forget_snapshots() {
      this._pending_snapshot = null;
      this._good_snapshot = null;
      this._last_snapshot_step = -Infinity;
      this.rollback_to = null;
      this._rollback_cause = [0, ""];
    }

    get good_snapshot_step() {
      return this._good_snapshot === null ? null : this._good_snapshot[0];
    }

    snapshot_due(step) {
      return (
        this._pending_snapshot === null &&
        this.rollback_to === null &&
        step - this._last_snapshot_step >= this.snapshot_every &&
        step >= this.ignore_until &&
        this.intervention.mode === "normal" &&
        this.nonfinite_streak === 0
      );
    }

    snapshot_taken(step, nbytes) {
      this._pending_snapshot = [step, nbytes];
      this._last_snapshot_step = step;
    }

    _settle_snapshot(step) {
      const pending = this._pending_snapshot;
      if (pending !== null && pending[0] === step &&
          this.spike.last_zscore <= NORMAL_BAND_ZSCORE) {
        this._good_snapshot = pending;
        this._pending_snapshot = null;
      }
    }

    _request_rollback(step, cause) {
      if (this._good_snapshot === null || this.rollback_to !== null) return;
      this.rollback_to = this._good_snapshot[0];
      this._rollback_cause = [step, cause];
    }

    rolled_back(now) {
      if (this.rollback_to === null || this._good_snapshot === null) {
        throw new Error("rolled_back() without a rollback decision (rollback_to is None)");
      }
      const [target, nbytes] = this._good_snapshot;
      const [step, cause] = this._rollback_cause;
      this.rollback_to = null;
      this._pending_snapshot = null;
      this.ignore_until = Math.max(this.ignore_until, now);
      this.nonfinite_streak = 0;
      const why =
        `${cause}: restored the snapshot of step ${target} (${_format_bytes(nbytes)}), ` +
        `undoing the updates of steps ${target} to ${now - 1} (${now - target} steps)`;
      const scale = this.lr_scale(now);
      const event = Event(step, EventKind.ROLLBACK, why, scale, scale, this.phase);
      this.events.push(event);
      return event;
    }

    _warmup_update(step, loss) {
      const signal = this.stabilizer.update(loss);
      const ready =
        this.config.warmup === "auto" &&
        signal === Signal.STABILIZED &&
        step + 1 >= this.min_warmup &&
        !this.paused &&
        this.intervention.mode === "normal" &&
        this._base(step + 1 - this._plan.start) >= 1.0;
      if (!ready) return [];
      const det = this.stabilizer;
      const why =
        `loss stabilized: its EMA fell ${percent(det.last_drop, 2)} over the last ` +
        `${det.window} steps (threshold ${percent(det.threshold, 2)}) for ${det.patience} ` +
        "steps in a row";
      return [this._end_warmup(step, why)];
    }

    _warmup_deadline_reason() {
      if (this.config.warmup !== "auto") {
        return `fixed warmup of ${this.max_warmup} steps finished`;
      }
      const det = this.stabilizer;
      let seen;
      if (det.last_drop === null) {
        seen = `no drop measured yet: the window is ${det.window} steps`;
      } else {
        seen =
          `last drop ${percent(det.last_drop, 2)} per ${det.window} steps, threshold ` +
          `${percent(det.threshold, 2)}; below it ${det.streak} steps in a row of the ` +
          `${det.patience} needed`;
      }
      return `max_warmup=${this.max_warmup} steps reached before the loss stabilized (${seen})`;
    }

    _end_warmup(step, why) {
      const before = this.lr_scale(step + 1);
      this.paused = false;
      this._set_plan(this._decay_plan(step + 1, this._base(step + 1 - this._plan.start)));
      this.phase = this._plan_phase(step + 1);
      this.plateau.reset();
      return this._event(step, EventKind.WARMUP_END, why, before);
    }

    _plateau_update(step, loss) {
      if (this.plateau.update(loss) !== Signal.PLATEAU) return [];
      const cfg = this.config;
      const det = this.plateau;
      const before = this.lr_scale(step + 1);
      const current = this._base(step + 1 - this._plan.start);
      const stalled =
        `the smoothed loss (EMA ${g(det.ema, 4)}) has not improved by ` +
        `${percent(det.min_delta, 2)} on its best ${g(det.best, 4)} for ${det.patience} steps; `;
      if (cfg.plateau_action === "restart" && this.restarts < cfg.max_restarts) {
        this.restarts += 1;
        this._set_plan(
          this._decay_plan(step + 1, cfg.restart_peak, { v0: current, ramp: this.restart_warmup }),
        );
        const why =
          `${stalled}restart ${this.restarts}/${cfg.max_restarts}: re-warm from ` +
          `${g(current, 3)} to ${g(cfg.restart_peak)} of the peak ` +
          `over ${this.restart_warmup} steps`;
        return [this._event(step, EventKind.RESTART, why, before)];
      }
      const cut = Math.max(this.floor, current * cfg.plateau_factor);
      if (cut >= current) return [];
      this._set_plan(this._decay_plan(step + 1, cut));
      const why =
        `${stalled}LR scale cut x${g(cfg.plateau_factor)} from ${g(current, 3)} to ${g(cut, 3)}`;
      return [this._event(step, EventKind.PLATEAU, why, before)];
    }

    _cut_for_spike(step, kind, why) {
      const before = this.lr_scale(step + 1);
      const hold_until = step + 1 + this.spike_cooldown;
      if (this.intervention.mode === "hold") {
        this.intervention.hold_until = hold_until;
        why += `already cut, cooldown extended to step ${hold_until}`;
        return this._event(step, kind, why, before);
      }
      const current = this.intervention.at(step + 1);
      const value = Math.max(this.floor, current * this.config.spike_factor);
      this.intervention = new _Intervention({ mode: "hold", value, hold_until });
      if (this.phase === Phase.WARMUP && !this.paused) {
        this.paused = true;
        const frozen = this._base(step + 1 - this._plan.start);
        this._set_plan(new _Plan(step + 1, frozen, frozen, 0, null, 0, "linear"));
        why += "warmup ramp paused; ";
      }
      why +=
        `LR multiplier cut x${g(this.config.spike_factor)} to ${g(value, 3)}, ` +
        `held for ${this.spike_cooldown} steps`;
      return this._event(step, kind, why, before);
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
        recover_start: step + 1,
        recover_steps: this.spike_recovery,
      });
      let why =
        `loss ${g(loss, 4)} is back within ${g(NORMAL_BAND_ZSCORE)} sigma of its running mean ` +
        `${g(this.spike.mean, 4)}; LR multiplier ramps from ${g(held.value, 3)} back to 1 over ` +
        `${this.spike_recovery} steps`;
      if (this.paused) {
        this.paused = false;
        const current = this._base(step + 1 - this._plan.start);
        const ramp = Math.ceil((1.0 - current) * this.min_warmup);
        this._set_plan(
          this._decay_plan(step + 1, 1.0, { v0: current, ramp, decay_start: this.max_warmup }),
        );
        why += "; warmup ramp resumed";
      }
      return [this._event(step, EventKind.RECOVERED, why, before)];
    }

    // ---------------------------------------------------------------- plans
    _decay_plan(start, v1, { v0 = null, ramp = 0, decay_start = null } = {}) {
      const ramp_end = start + ramp;
      decay_start = decay_start === null ? ramp_end : Math.max(decay_start, ramp_end);
      const remaining = Math.max(0, this.total_steps - decay_start);
      let shape = this.config.decay;
      let stable = 0;
      if (shape === "wsd") {
        stable = S.config.py_round(remaining * (1.0 - this.config.wsd_decay_fraction));
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
