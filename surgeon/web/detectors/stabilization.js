// Port of surgeon/detectors/stabilization.py (see there for the statistic and its reasons).
(function (S) {
  "use strict";
  const { Signal } = S.detectors;
  const _TINY = 1e-300;

  class StabilizationDetector {
    constructor(window = 50, threshold = 0.02, patience = 10) {
      this.window = window;
      this.threshold = threshold;
      this.patience = patience;
      this.alpha = 2.0 / (window + 1);
      this.reset();
    }

    reset() {
      this.ema = null;
      this.history = []; // a deque of at most window + 1 EMAs
      this.streak = 0;
      this.last_drop = null;
    }

    update(loss) {
      this.ema = this.ema === null ? loss : this.ema + this.alpha * (loss - this.ema);
      this.history.push(this.ema);
      if (this.history.length > this.window + 1) this.history.shift();
      if (this.history.length <= this.window) return null;
      const old = this.history[0];
      this.last_drop = (old - this.ema) / Math.max(Math.abs(old), _TINY);
      this.streak = this.last_drop < this.threshold ? this.streak + 1 : 0;
      return this.streak >= this.patience ? Signal.STABILIZED : null;
    }
  }

  S.detectors.StabilizationDetector = StabilizationDetector;
})((globalThis.surgeon ||= {}));
