// Port of surgeon/detectors/__init__.py: what a detector reports about the loss it was fed.
(function (S) {
  "use strict";

  const Signal = Object.freeze({
    STABILIZED: "stabilized",
    RISING: "rising",
    PLATEAU: "plateau",
    SPIKE: "spike",
    NONFINITE: "nonfinite",
  });

  S.detectors = { Signal };
})((globalThis.surgeon ||= {}));
