// Python's float formatting, for the controller's reasons: the same text as the f-strings of
// surgeon/controller.py (format specs "g", ".Ng", ".Nf", ".N%" and str() of a non-finite
// float), rounding the exact binary value half to even as CPython does.
(function (S) {
  "use strict";

  // The exact decimal expansion of a finite x > 0 as {digits, point}: x = 0.digits x 10^point.
  function decimal(x) {
    let text;
    if (x >= 1e21) {
      text = BigInt(x).toString(); // an integer: exact
    } else if (x >= 1e-50) {
      text = x.toFixed(100); // exact for every double in this range that could be a tie
    } else {
      const [mantissa, exponent] = x.toExponential(30).split("e");
      return { digits: mantissa.replace(".", ""), point: Number(exponent) + 1 };
    }
    const [whole, fraction = ""] = text.split(".");
    let digits = whole + fraction;
    let point = whole.length;
    const lead = digits.search(/[1-9]/);
    digits = digits.slice(lead).replace(/0+$/, "");
    point -= lead;
    return { digits, point };
  }

  // Keep `keep` leading digits of `dec`, rounding the rest half to even.
  function round(dec, keep) {
    if (keep < 0) return { digits: "", point: dec.point };
    const head = dec.digits.slice(0, keep);
    const rest = dec.digits.slice(keep);
    let up = false;
    if (rest.length > 0) {
      if (rest[0] > "5" || (rest[0] === "5" && /[1-9]/.test(rest.slice(1)))) up = true;
      else if (rest[0] === "5") up = head.length > 0 && Number(head[head.length - 1]) % 2 === 1;
    }
    if (!up) return { digits: head, point: dec.point };
    let carried = (BigInt(head || "0") + 1n).toString();
    let point = dec.point;
    if (carried.length > Math.max(head.length, 1) || head.length === 0) point += 1;
    if (head.length === 0) carried = "1";
    return { digits: carried, point };
  }

  function nonfinite(x) {
    return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
  }

  function sign(x) {
    return x < 0 || Object.is(x, -0) ? "-" : "";
  }

  // digits/point as fixed notation with `decimals` digits after the point
  function fixed(dec, decimals) {
    const { digits, point } = dec;
    const all = digits.padEnd(point + decimals, "0");
    const whole = point > 0 ? all.slice(0, point) : "0";
    const fraction = point >= 0 ? all.slice(point) : "0".repeat(-point) + all;
    return decimals > 0 ? `${whole}.${fraction.slice(0, decimals).padEnd(decimals, "0")}` : whole;
  }

  // format(x, ".Nf")
  function f(x, decimals) {
    if (!Number.isFinite(x)) return nonfinite(x);
    if (x === 0) return sign(x) + (0).toFixed(decimals);
    const dec = decimal(Math.abs(x));
    return sign(x) + fixed(round(dec, dec.point + decimals), decimals);
  }

  // format(x, ".Ng") (precision 6 when omitted, as format(x, "g"))
  function g(x, precision = 6) {
    if (!Number.isFinite(x)) return nonfinite(x);
    const p = Math.max(precision, 1);
    if (x === 0) return sign(x) + "0";
    const dec = round(decimal(Math.abs(x)), p);
    const exponent = dec.point - 1;
    const strip = (text) => (text.includes(".") ? text.replace(/\.?0+$/, "") : text);
    if (exponent >= -4 && exponent < p) return sign(x) + strip(fixed(dec, p - 1 - exponent));
    const mantissa = strip(fixed({ digits: dec.digits, point: 1 }, p - 1));
    const e = Math.abs(exponent).toString().padStart(2, "0");
    return `${sign(x)}${mantissa}e${exponent < 0 ? "-" : "+"}${e}`;
  }

  // format(x, ".N%")
  function percent(x, decimals) {
    return f(x * 100, decimals) + "%";
  }

  // str(x) / repr(x) of a float: the shortest digits that read back as x, in Python's layout
  function str(x) {
    if (!Number.isFinite(x)) return nonfinite(x);
    if (x === 0) return sign(x) + "0.0";
    const [mantissa, e] = Math.abs(x).toExponential().split("e");
    const dec = { digits: mantissa.replace(".", ""), point: Number(e) + 1 };
    const exponent = dec.point - 1;
    if (exponent >= -4 && exponent < 16) {
      return sign(x) + fixed(dec, Math.max(dec.digits.length - dec.point, 1));
    }
    const digits = dec.digits.length > 1 ? `${dec.digits[0]}.${dec.digits.slice(1)}` : dec.digits;
    const padded = Math.abs(exponent).toString().padStart(2, "0");
    return `${sign(x)}${digits}e${exponent < 0 ? "-" : "+"}${padded}`;
  }

  // "1 step", "2 steps", "3 non-finite steps": a count in a reason (Python: controller._steps)
  function steps(count, kind = "") {
    return `${count} ${kind}step` + (count === 1 ? "" : "s");
  }

  S.format = { f, g, percent, str, steps };
})((globalThis.surgeon ||= {}));
