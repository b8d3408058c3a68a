// Port of surgeon/detectors/stabilization.py (see there for the statistic and its reasons).
(function (S) {
  "use strict";
  const { Signal } = S.detectors;
  const _TINY = 1e-300;
  const SIGNIFICANCE = 2.0;

  class StabilizationDetector {
    constructor(window = 50, threshold = 0.02, patience = 10) {
      this.window = window;
      this.threshold = threshold;
      this.patience = patience;
      this.alpha = 2.0 / (window + 1);
      this._ema_noise = Math.sqrt((2.0 * this.alpha) / (2.0 - this.alpha));
      this.reset();
    }

    reset() {
      this.ema = null;
      this.history = []; // a deque of at most window + 1 EMAs
      this.streak = 0;
      this.last_drop = null;
      this.last_noise = 0.0;
      this.steep_seen = false;
      this.steep_run = 0;
      this.rise_run = 0;
      this.rise_base = 0.0;
      this.count = 0;
      this.prev = 0.0;
      this.diff_var = 0.0;
    }

    update(loss) {
      this.count += 1;
      if (this.count > 1) {
        const diff = loss - this.prev;
        const weight = Math.max(this.alpha, 1.0 / (this.count - 1));
        const variance = this.diff_var + weight * (diff * diff - this.diff_var);
        if (Number.isFinite(variance)) this.diff_var = variance;
      }
      this.prev = loss;
      this.ema = this.ema === null ? loss : this.ema + this.alpha * (loss - this.ema);
      this.history.push(this.ema);
      if (this.history.length > this.window + 1) this.history.shift();
      if (this.history.length <= this.window) return null;
      const old = Math.max(Math.abs(this.history[0]), _TINY);
      this.last_drop = (this.history[0] - this.ema) / old;
      this.last_noise = (Math.sqrt(this.diff_var / 2.0) * this._ema_noise) / old;
      const margin = SIGNIFICANCE * this.last_noise;
      if (-this.last_drop > Math.max(this.threshold, margin)) {
        this.streak = this.steep_run = 0;
        if (this.rise_run === 0) this.rise_base = this.history[0];
        this.rise_run += 1;
        return Signal.RISING;
      }
      this.rise_run = 0;
      if (this.last_drop - margin > this.threshold) {
        this.steep_run += 1;
        this.steep_seen = this.steep_seen || this.steep_run >= this.patience;
        this.streak = 0;
        return null;
      }
      this.steep_run = 0;
      if (-this.last_drop > margin) {
        this.streak = 0;
        return null;
      }
      this.streak += 1;
      return this.steep_seen && this.streak >= this.patience ? Signal.STABILIZED : null;
    }

    restart_rise() {
      this.rise_run = 1;
      this.rise_base = this.ema !== null ? this.ema : 0.0;
    }
  }

  S.detectors.StabilizationDetector = StabilizationDetector;
})((globalThis.surgeon ||= {}));
