// Port of surgeon/detectors/spike.py (see there for the statistic and its reasons).
(function (S) {
  "use strict";
  const { Signal } = S.detectors;

  class SpikeDetector {
    constructor(zscore = 6.0, ratio = 1.5, alpha = 0.03, min_observations = 20) {
      this.zscore = zscore;
      this.ratio = ratio;
      this.alpha = alpha;
      this.min_observations = min_observations;
      this.reset();
    }

    reset() {
      this.mean = 0.0;
      this.var = 0.0;
      this.count = 0;
      this.last_zscore = 0.0;
    }

    get std() {
      return Math.sqrt(this.var);
    }

    update(loss) {
      if (!Number.isFinite(loss)) return Signal.NONFINITE;
      if (this.count === 0) {
        this.mean = loss;
        this.count = 1;
        return null;
      }
      const std = this.std;
      const excess = loss - this.mean;
      this.last_zscore = std > 0 ? excess / std : excess > 0 ? Infinity : 0.0;
      const is_spike =
        this.count >= this.min_observations &&
        this.last_zscore > this.zscore &&
        excess > (this.ratio - 1.0) * Math.abs(this.mean) &&
        (std > 0 || this.mean !== 0);
      if (std > 0) {
        loss = Math.min(loss, this.mean + this.zscore * std);
      } else if (is_spike && (this.ratio - 1.0) * Math.abs(this.mean) > 0) {
        loss = this.mean + (this.ratio - 1.0) * Math.abs(this.mean);
      }
      const diff = loss - this.mean;
      const increment = this.alpha * diff;
      const variance = (1.0 - this.alpha) * (this.var + diff * increment);
      if (!Number.isFinite(variance)) return is_spike ? Signal.SPIKE : null;
      this.mean += increment;
      this.var = variance;
      this.count += 1;
      return is_spike ? Signal.SPIKE : null;
    }
  }

  S.detectors.SpikeDetector = SpikeDetector;
})((globalThis.surgeon ||= {}));
