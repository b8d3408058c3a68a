// Port of surgeon/schedules.py: the shapes the controller and the preview page use, with the
// same names and the same arithmetic (operand order included). The factories trust their
// arguments: the Python side validates, and the page's sliders only make valid ones.
(function (S) {
  "use strict";

  function _lerp(start, end, elapsed, span) {
    return start + (end - start) * (elapsed / span);
  }

  function _cosine_interp(start, end, elapsed, span) {
    return end + ((start - end) * (1.0 + Math.cos((Math.PI * elapsed) / span))) / 2.0;
  }

  function _sqrt_interp(start, end, elapsed, span) {
    return end + (start - end) * (1.0 - Math.sqrt(elapsed / span));
  }

  const _SHAPES = { cosine: _cosine_interp, linear: _lerp, sqrt: _sqrt_interp };

  function _ramp(start, end, begin, finish, interp) {
    const span = finish - begin;
    return (step) => {
      if (step >= finish) return end;
      if (step <= begin) return start;
      return interp(start, end, step - begin, span);
    };
  }

  function _decay(name, start_lr, end_lr, steps) {
    return _ramp(start_lr, end_lr, 0, steps, _SHAPES[name]);
  }

  function constant(lr) {
    return () => lr;
  }

  function linear(start_lr, end_lr, total_steps) {
    return _ramp(start_lr, end_lr, 0, total_steps, _lerp);
  }

  function cosine(lr, total_steps, min_lr = 0.0) {
    return _ramp(lr, min_lr, 0, total_steps, _cosine_interp);
  }

  function decay_shape(name, start_lr, end_lr, total_steps) {
    return _decay(name, start_lr, end_lr, total_steps);
  }

  // bisect.bisect_right(starts, step): how many starts are <= step
  function _bisect_right(starts, step) {
    let low = 0;
    let high = starts.length;
    while (low < high) {
      const mid = (low + high) >> 1;
      if (step < starts[mid]) high = mid;
      else low = mid + 1;
    }
    return low;
  }

  function join(schedules, boundaries) {
    const offsets = [0, ...boundaries];
    const starts = offsets.slice(1);
    return (step) => {
      const index = _bisect_right(starts, step);
      return schedules[index](step - offsets[index]);
    };
  }

  function warmup_cosine(lr, warmup_steps, total_steps, min_lr = 0.0) {
    return join(
      [linear(0.0, lr, warmup_steps), cosine(lr, total_steps - warmup_steps, min_lr)],
      [warmup_steps],
    );
  }

  function wsd(lr, warmup_steps, total_steps, decay_fraction = 0.1, min_lr = 0.0,
               decay_shape = "linear") {
    const decay_steps = S.config.py_round(decay_fraction * total_steps);
    const decay = _decay(decay_shape, lr, min_lr, decay_steps);
    const decay_start = total_steps - decay_steps;
    const phases = [
      [warmup_steps, linear(0.0, lr, warmup_steps)],
      [decay_start - warmup_steps, constant(lr)],
    ];
    const pieces = [];
    const boundaries = [];
    let elapsed = 0;
    for (const [length, piece] of phases) {
      if (length > 0) {
        elapsed += length;
        pieces.push(piece);
        boundaries.push(elapsed);
      }
    }
    return join([...pieces, decay], boundaries);
  }

  S.schedules = { constant, linear, cosine, decay_shape, join, warmup_cosine, wsd };
})((globalThis.surgeon ||= {}));
