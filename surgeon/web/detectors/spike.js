// Port of surgeon/detectors/spike.py (see there for the statistic and its reasons).
(function (S) {
  "use strict";
  const { Signal } = S.detectors;

  // statistics.median of a list of numbers
  function median(values) {
    const sorted = [...values].sort((a, b) => a - b);
    const half = Math.floor(sorted.length / 2);
    return sorted.length % 2 ? sorted[half] : (sorted[half - 1] + sorted[half]) / 2;
  }

  const WINDOW_CAP = 3.0;
  const MEDIAN_ABS_DIFF = 0.6745 * Math.sqrt(2.0);

  class SpikeDetector {
    constructor(zscore = 6.0, ratio = 1.5, alpha = 0.03, min_observations = 10, window = 16) {
      this.zscore = zscore;
      this.ratio = ratio;
      this.alpha = alpha;
      this.min_observations = min_observations;
      this.window = window;
      this.reset();
    }

    reset() {
      this.recent = []; // a deque of at most window losses
      this.mean = 0.0;
      this.var = 0.0;
      this.diffs = []; // the last window |x_t - x_{t-1}|
      this.count = 0;
      this.last_zscore = 0.0;
    }

    get std() {
      let sigma = Math.sqrt(this.var / 2.0);
      if (this.diffs.length === this.window) {
        const med = median(this.diffs);
        if (med > 0) sigma = Math.min(sigma, (WINDOW_CAP * med) / MEDIAN_ABS_DIFF);
      }
      return sigma;
    }

    _push(loss) {
      this.recent.push(loss);
      if (this.recent.length > this.window) this.recent.shift();
    }

    update(loss) {
      if (!Number.isFinite(loss)) return Signal.NONFINITE;
      if (this.count === 0) {
        this._push(loss);
        this.mean = loss;
        this.count = 1;
        return null;
      }
      const std = this.std;
      const level = this.mean;
      const excess = loss - level;
      this.last_zscore = std > 0 ? excess / std : excess > 0 ? Infinity : 0.0;
      const is_spike =
        this.count >= this.min_observations &&
        this.last_zscore > this.zscore &&
        excess > (this.ratio - 1.0) * Math.abs(level) &&
        (std > 0 || level !== 0);
      let diff = loss - this.recent[this.recent.length - 1];
      this.diffs.push(Math.abs(diff));
      if (this.diffs.length > this.window) this.diffs.shift();
      const limit = this.var > 0 ? this.zscore * Math.sqrt(this.var)
                                 : (this.ratio - 1.0) * Math.abs(level);
      diff = Math.max(-limit, Math.min(limit, diff));
      const weight = Math.max(this.alpha, 1.0 / this.count);
      const variance = this.var + weight * (diff * diff - this.var);
      if (Number.isFinite(variance)) this.var = variance;
      this._push(loss);
      this.mean = median(this.recent);
      this.count += 1;
      return is_spike ? Signal.SPIKE : null;
    }

    rebase(level) {
      this.recent = new Array(Math.max(1, this.recent.length)).fill(level);
      this.mean = level;
      this.last_zscore = 0.0;
    }
  }

  S.detectors.SpikeDetector = SpikeDetector;
})((globalThis.surgeon ||= {}));
