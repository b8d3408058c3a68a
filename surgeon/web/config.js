// Port of surgeon/config.py: how a length in steps resolves against the run. JS numbers do
// not tell 1 (a step) from 1.0 (the whole run): the page and the tests hand the port lengths
// already resolved to steps (surgeon.web.js_config); a non-integer is a fraction here.
(function (S) {
  "use strict";

  // Python's round(): to the nearest integer, halves to even
  function py_round(x) {
    const floor = Math.floor(x);
    const diff = x - floor;
    if (diff > 0.5) return floor + 1;
    if (diff < 0.5) return floor;
    return floor % 2 === 0 ? floor : floor + 1;
  }

  function resolve_steps(name, value, total_steps, minimum = 0) {
    const steps = Number.isInteger(value) ? value : py_round(value * total_steps);
    return Math.max(minimum, steps);
  }

  S.config = { py_round, resolve_steps };
})((globalThis.surgeon ||= {}));
