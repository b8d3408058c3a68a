// Runs the JavaScript port (surgeon/web/*.js) on cases read as JSON from stdin and prints the
// results as JSON, for tests/test_web_port.py. Input: {"modules": [paths in load order],
// "cases": [{"kind": "replay" | "schedule" | "preview" | "format", ...}]}. Non-finite numbers
// travel as the strings "NaN", "Infinity", "-Infinity" both ways.
"use strict";
const fs = require("fs");

const revive = (_, v) => (v === "NaN" || v === "Infinity" || v === "-Infinity" ? Number(v) : v);
const replace = (_, v) => (typeof v === "number" && !Number.isFinite(v) ? String(v) : v);
const input = JSON.parse(fs.readFileSync(0, "utf8"), revive);
for (const path of input.modules) require(path);
const S = globalThis.surgeon;

function run(c) {
  switch (c.kind) {
    case "replay":
      return S.replay.replay(c.losses, c.settings, { update_skipped: c.update_skipped,
                                                     steps: c.steps, passed: c.passed,
                                                     checkpoints: c.checkpoints || [],
                                                     end_read: c.end_read === undefined || Boolean(c.end_read) });
    case "schedule":
      return c.steps.map((step) => S.schedules[c.name](...c.args)(step));
    case "preview":
      return c.steps.map((step) => S.page.preview_schedule(c.params)(step));
    case "format":
      return c.values.map(([x, spec]) => {
        if (spec === "str") return S.format.str(x);
        if (spec.endsWith("%")) return S.format.percent(x, Number(spec.slice(1, -1)));
        if (spec.endsWith("f")) return S.format.f(x, Number(spec.slice(1, -1)));
        return spec === "g" ? S.format.g(x) : S.format.g(x, Number(spec.slice(1, -1)));
      });
    default:
      throw new Error(`unknown case kind ${c.kind}`);
  }
}

process.stdout.write(JSON.stringify(input.cases.map(run), replace));
