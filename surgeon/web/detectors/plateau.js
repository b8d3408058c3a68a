// Port of surgeon/detectors/plateau.py (see there for the statistic and its reasons).
(function (S) {
  "use strict";
  const { Signal } = S.detectors;

  class PlateauDetector {
    constructor(patience = 500, min_delta = 1e-3, cooldown = 500, alpha = null) {
      alpha = alpha === null ? 2.0 / (patience + 1) : alpha;
      this.patience = patience;
      this.min_delta = min_delta;
      this.cooldown = cooldown;
      this.alpha = alpha;
      this._warm_count = Math.ceil(1.0 / alpha - 1e-9);
      this.reset();
    }

    reset() {
      this.count = 0;
      this.ema = null;
      this.best = null;
      this.bad_steps = 0;
      this.cooldown_left = 0;
    }

    update(loss) {
      this.count += 1;
      const weight = Math.max(this.alpha, 1.0 / this.count);
      this.ema = this.ema === null ? loss : this.ema + weight * (loss - this.ema);
      if (this.count < this._warm_count) return null;
      if (this.best === null || this.ema < this.best - this.min_delta * Math.abs(this.best)) {
        this.best = this.ema;
        this.bad_steps = 0;
      } else {
        this.bad_steps += 1;
      }
      if (this.cooldown_left > 0) {
        this.cooldown_left -= 1;
        this.bad_steps = 0;
        return null;
      }
      if (this.bad_steps >= this.patience) {
        this.bad_steps = 0;
        this.cooldown_left = this.cooldown;
        return Signal.PLATEAU;
      }
      return null;
    }
  }

  S.detectors.PlateauDetector = PlateauDetector;
})((globalThis.surgeon ||= {}));
