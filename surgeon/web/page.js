// The interactive page: sliders, an inline SVG chart, the events table. Two modes, from the
// JSON data inlined by surgeon/web/__init__.py:
//  * "preview": a warmup + decay schedule (schedules.js) from sliders for the planned length,
//    the warmup, peak and floor, the decay shape; a marker reads the LR at a step;
//  * "replay": a logged loss stream through the controller port (replay.js) with the run's
//    settings; moving a setting's slider re-runs the decisions and redraws.
// What is drawn is also on window.surgeonPage (tests read it).
(function (S) {
  "use strict";

  const SHAPES = ["cosine", "linear", "sqrt", "wsd"];

  // The preview's curve: a linear warmup from 0 to `peak` over `warmup_steps`, then the decay
  // to `floor x peak` by `total_steps` (wsd: hold, then linear over the last decay_fraction).
  function preview_schedule(p) {
    const { schedules } = S;
    const min_lr = p.peak * p.floor;
    if (p.shape === "wsd") {
      const decay_steps = S.config.py_round(p.decay_fraction * p.total_steps);
      if (p.warmup_steps + decay_steps > p.total_steps) {
        throw new Error(
          `warmup_steps + round(decay_fraction * total_steps) must be <= total_steps, got ` +
            `warmup_steps=${p.warmup_steps}, ${decay_steps} decay steps, ` +
            `total_steps=${p.total_steps}`,
        );
      }
      return schedules.wsd(p.peak, p.warmup_steps, p.total_steps, p.decay_fraction, min_lr);
    }
    return schedules.join(
      [
        schedules.linear(0.0, p.peak, p.warmup_steps),
        schedules.decay_shape(p.shape, p.peak, min_lr, p.total_steps - p.warmup_steps),
      ],
      [p.warmup_steps],
    );
  }

  S.page = { preview_schedule };
  if (typeof document === "undefined") return; // under node: the functions above only

  // ------------------------------------------------------------------------ helpers
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const data = JSON.parse($("surgeon-data").textContent, (_, v) =>
    v === "NaN" || v === "Infinity" || v === "-Infinity" ? Number(v) : v,
  );
  const fmt = (x, p = 4) => S.format.g(x, p);

  function el(name, attrs = {}, parent = null, text = null) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) if (v !== null) node.setAttribute(k, v);
    if (text !== null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function round_sig(x, digits) {
    return x === 0 ? 0 : Number(x.toPrecision(digits));
  }

  // A slider: a label, its value, a range input (linear or log10 positions) and a note.
  // `on` gets the new value; `set` moves it from outside (a clamp by another slider).
  function slider(parent, spec, value, on) {
    const box = document.createElement("div");
    box.className = "control";
    const label = document.createElement("label");
    label.htmlFor = spec.key;
    label.textContent = spec.label;
    const out = document.createElement("output");
    out.id = `${spec.key}-value`;
    const input = document.createElement("input");
    input.type = "range";
    input.id = spec.key;
    input.name = spec.key;
    const low = Math.min(spec.min, value);
    const high = Math.max(spec.max, value);
    const to_pos = (v) => (spec.log ? Math.log10(v) : v);
    const from_pos = (pos) => {
      const v = spec.log ? round_sig(10 ** pos, spec.digits || 2) : pos;
      return spec.integer ? Math.round(v) : v;
    };
    input.min = String(to_pos(low));
    input.max = String(to_pos(high));
    input.step = String(spec.log ? 0.01 : spec.step);
    const show = (v) => {
      out.textContent = spec.format ? spec.format(v) : fmt(v);
    };
    const set = (v) => {
      input.value = String(to_pos(v));
      show(v);
    };
    input.addEventListener("input", () => {
      const v = from_pos(Number(input.value));
      show(v);
      on(v);
    });
    box.append(label, out, input);
    if (spec.note) {
      const note = document.createElement("small");
      note.textContent = spec.note;
      box.append(note);
    }
    parent.append(box);
    set(value);
    return { set, input };
  }

  function select(parent, key, label, options, value, on) {
    const box = document.createElement("div");
    box.className = "control";
    const lab = document.createElement("label");
    lab.htmlFor = key;
    lab.textContent = label;
    const input = document.createElement("select");
    input.id = key;
    for (const option of options) input.add(new Option(option, option, false, option === value));
    input.addEventListener("change", () => on(input.value));
    box.append(lab, document.createElement("span"), input);
    parent.append(box);
    return input;
  }

  // ------------------------------------------------------------------------ the chart
  function nice_ticks(low, high, count) {
    if (!(high > low)) return [low];
    const raw = (high - low) / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const ticks = [];
    // whole multiples of the step (adding it up left -5.55e-17 where the axis crosses 0)
    for (let k = Math.ceil(low / step); k * step <= high + step * 1e-9; k++) {
      ticks.push(round_sig(k * step, 12));
    }
    return ticks;
  }

  function log_ticks(low, high) {
    const ticks = [];
    for (let k = Math.floor(Math.log10(low)); k <= Math.ceil(Math.log10(high)); k++) {
      for (const m of high / low < 100 ? [1, 2, 5] : [1]) {
        const t = m * 10 ** k;
        if (t >= low && t <= high) ticks.push(round_sig(t, 12));
      }
    }
    return ticks.length >= 2 ? ticks : [low, high];
  }

  // One panel: {top, height, y_label, log, series: [{xs, ys, color, width, opacity, id}]}
  function panel(svg, box, x_of, x_ticks, spec) {
    // a log axis only where every finite value is positive (a loss may be negative or 0)
    if (spec.log) spec = { ...spec, log: spec.series.every((s) => s.ys.every(
      (v) => !Number.isFinite(v) || v > 0)) };
    let low = Infinity;
    let high = -Infinity;
    for (const s of spec.series) { // a loop: spreading 10^5 values as arguments overflows
      for (const v of s.ys) {
        if (Number.isFinite(v)) {
          if (v < low) low = v;
          if (v > high) high = v;
        }
      }
    }
    if (low === Infinity) [low, high] = spec.log ? [0.1, 1] : [0, 1]; // nothing finite
    if (!spec.log) low = Math.min(0, low);
    if (!(high > low)) high = low + (spec.log ? low : 1);
    if (spec.log) {
      low = low / 1.1;
      high = high * 1.1;
    } else {
      high += (high - low) * 0.05;
    }
    const f = spec.log ? Math.log10 : (v) => v;
    const y_of = (v) => spec.top + spec.height * (1 - (f(v) - f(low)) / (f(high) - f(low)));
    const ticks = spec.log ? log_ticks(low, high) : nice_ticks(low, high, 5);
    for (const t of ticks) {
      const y = y_of(t);
      el("line", { x1: box.left, x2: box.right, y1: y, y2: y, class: "grid" }, svg);
      el("text", { x: box.left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, svg, fmt(t, 3));
    }
    for (const t of x_ticks) {
      el("line", { x1: x_of(t), x2: x_of(t), y1: spec.top, y2: spec.top + spec.height,
                   class: "grid" }, svg);
    }
    el("rect", { x: box.left, y: spec.top, width: box.right - box.left, height: spec.height,
                 fill: "none", class: "axis" }, svg);
    el("text", { x: 14, y: spec.top + spec.height / 2, class: "tick",
                 transform: `rotate(-90 14 ${spec.top + spec.height / 2})`,
                 "text-anchor": "middle" }, svg, spec.y_label);
    for (const s of spec.series) {
      el("polyline", { points: decimate(s.xs, s.ys, x_of, y_of, spec.log), fill: "none",
                       stroke: s.color, "stroke-width": s.width || 1.5,
                       "stroke-opacity": s.opacity || 1, id: s.id }, svg);
    }
    return y_of;
  }

  // The points of a polyline, at most two per pixel column (its min and max), so a long
  // stream draws fast and a one-step spike still shows.
  function decimate(xs, ys, x_of, y_of, log) {
    const out = [];
    let column = null;
    let lo = null;
    let hi = null;
    const flush = () => {
      if (column === null) return;
      out.push(`${column},${y_of(lo).toFixed(2)}`);
      if (hi !== lo) out.push(`${column},${y_of(hi).toFixed(2)}`);
    };
    for (let i = 0; i < xs.length; i++) {
      const v = ys[i];
      if (!Number.isFinite(v) || (log && v <= 0)) continue;
      const x = Math.round(x_of(xs[i]) * 2) / 2;
      if (x !== column) {
        flush();
        column = x;
        lo = hi = v;
      } else {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
    flush();
    return out.join(" ");
  }

  function draw(spec) {
    const svg = $("chart");
    svg.replaceChildren();
    const box = { left: 70, right: 945 };
    const first = spec.x_range[0];
    const last = Math.max(spec.x_range[1], first + 1);
    const x_of = (s) => box.left + ((s - first) / (last - first)) * (box.right - box.left);
    const x_ticks = nice_ticks(first, last, 8);
    const bottom = spec.panels[spec.panels.length - 1];
    for (const [name, start, end] of spec.phases || []) {
      for (const p of spec.panels) {
        el("rect", { x: x_of(start), y: p.top, width: Math.max(x_of(end) - x_of(start), 0.5),
                     height: p.height, fill: spec.colors.phases[name] || "#eeeeee",
                     class: `phase phase-${name}` }, svg);
      }
    }
    const y_ofs = spec.panels.map((p) => panel(svg, box, x_of, x_ticks, p));
    for (const t of x_ticks) {
      el("text", { x: x_of(t), y: bottom.top + bottom.height + 16, "text-anchor": "middle",
                   class: "tick" }, svg, fmt(t, 6));
    }
    el("text", { x: (box.left + box.right) / 2, y: bottom.top + bottom.height + 34,
                 "text-anchor": "middle", class: "tick" }, svg, "optimizer step");
    for (const e of spec.events || []) {
      for (const p of spec.panels) {
        const line = el("line", { x1: x_of(e.step), x2: x_of(e.step), y1: p.top,
                                  y2: p.top + p.height, stroke: spec.colors.events[e.kind] ||
                                  "#555555", "stroke-width": 1.2, "stroke-dasharray": "5 3",
                                  class: `event event-${e.kind}` }, svg);
        el("title", {}, line, `step ${e.step}: ${e.kind}: ${e.reason}`);
      }
    }
    if (spec.marker) {
      const x = x_of(spec.marker.step);
      for (const p of spec.panels) {
        el("line", { x1: x, x2: x, y1: p.top, y2: p.top + p.height, stroke: "#111",
                     "stroke-width": 1, id: p === bottom ? "marker" : null }, svg);
      }
      if (Number.isFinite(spec.marker.value)) {
        el("circle", { cx: x, cy: y_ofs[y_ofs.length - 1](spec.marker.value), r: 4,
                       fill: "#111" }, svg);
      }
    }
  }

  function legend(items) {
    const box = $("legend");
    box.replaceChildren();
    for (const [label, color] of items) {
      const span = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = color;
      span.append(swatch, label);
      box.append(span);
    }
  }

  // ------------------------------------------------------------------------ preview mode
  function preview() {
    const start = data.start;
    const state = { ...start };
    const page = (window.surgeonPage = { mode: "preview", state, curve: [], marker: null,
                                         error: null });
    const controls = $("controls");
    $("source").textContent = "A warmup + decay schedule: move the sliders.";
    $("events").hidden = true;
    const steps_fmt = (v) => `${v} steps`;
    const ctl = {};
    ctl.total_steps = slider(controls, { key: "total_steps", label: "total steps", min: 10,
                                         max: 1e6, log: true, digits: 2, integer: true,
                                         format: steps_fmt }, state.total_steps, (v) => {
      state.total_steps = v;
      if (state.warmup_steps > v) ctl.warmup_steps.set((state.warmup_steps = v));
      ctl.warmup_steps.input.max = String(Math.max(v, state.warmup_steps));
      ctl.marker.input.max = String(v);
      if (state.marker > v) ctl.marker.set((state.marker = v));
      update();
    });
    ctl.warmup_steps = slider(controls, { key: "warmup_steps", label: "warmup length",
                                          min: 0, max: state.total_steps, step: 1,
                                          integer: true, format: (v) =>
                                            `${v} steps (${fmt((100 * v) / state.total_steps, 3)}%)` },
                              state.warmup_steps, (v) => {
      state.warmup_steps = v;
      update();
    });
    ctl.peak = slider(controls, { key: "peak", label: "peak LR", min: 1e-6, max: 1, log: true,
                                  digits: 2 }, state.peak, (v) => {
      state.peak = v;
      update();
    });
    ctl.floor = slider(controls, { key: "floor", label: "floor (x peak)", min: 0, max: 1,
                                   step: 0.01, format: (v) => `${fmt(v, 3)} = LR ` +
                                   fmt(v * state.peak, 3) }, state.floor, (v) => {
      state.floor = v;
      update();
    });
    select(controls, "shape", "decay shape", SHAPES, state.shape, (v) => {
      state.shape = v;
      update();
    });
    ctl.decay_fraction = slider(controls, { key: "decay_fraction", label: "wsd: decay share",
                                            min: 0.01, max: 1, step: 0.01,
                                            note: "the last share of the run that decays" },
                                state.decay_fraction, (v) => {
      state.decay_fraction = v;
      update();
    });
    ctl.marker = slider(controls, { key: "marker", label: "read the LR at step", min: 0,
                                    max: state.total_steps, step: 1, integer: true,
                                    format: steps_fmt }, state.marker, (v) => {
      state.marker = v;
      update();
    });
    const reset = document.createElement("button");
    reset.textContent = "reset";
    reset.addEventListener("click", () => {
      Object.assign(state, start);
      for (const [key, control] of Object.entries(ctl)) control.set(state[key]);
      $("shape").value = state.shape;
      update();
    });
    controls.append(reset);

    function update() {
      ctl.decay_fraction.input.disabled = state.shape !== "wsd";
      let schedule;
      try {
        schedule = preview_schedule(state);
        page.error = null;
        $("error").textContent = "";
      } catch (err) {
        page.error = err.message;
        $("error").textContent = err.message;
        return;
      }
      const total = state.total_steps;
      const count = Math.min(total, 2000);
      const steps = [...new Set(Array.from({ length: count + 1 },
                                           (_, i) => Math.round((i * total) / count)))];
      if (state.warmup_steps <= total && !steps.includes(state.warmup_steps)) {
        steps.push(state.warmup_steps);
        steps.sort((a, b) => a - b);
      }
      page.curve = steps.map((s) => [s, schedule(s)]);
      const lr = schedule(state.marker);
      page.marker = { step: state.marker, lr };
      $("readout").textContent =
        `step ${state.marker}: LR ${fmt(lr, 4)} (${fmt(lr / state.peak, 4)} of the peak ` +
        `${fmt(state.peak, 3)})`;
      legend([[`LR (${state.shape})`, "#264653"]]);
      draw({
        x_range: [0, total],
        colors: { phases: {}, events: {} },
        panels: [{ top: 20, height: 440, y_label: "learning rate", log: false,
                   series: [{ xs: steps, ys: page.curve.map((p) => p[1]), color: "#264653",
                              width: 2, id: "lr-curve" }] }],
        marker: { step: state.marker, value: lr },
      });
    }
    update();
  }

  // ------------------------------------------------------------------------ replay mode
  const REPLAY_SLIDERS = [
    { key: "spike_zscore", label: "spike: z-score above the running mean", min: 1, max: 15,
      step: 0.1 },
    { key: "spike_ratio", label: "spike: and x the running mean", min: 1, max: 5, step: 0.05 },
    { key: "spike_factor", label: "spike: LR cut factor", min: 0.05, max: 1, step: 0.05 },
    { key: "rollback_threshold", label: "rollback: spike x the running mean", min: 1,
      max: 20, step: 0.5 },
    { key: "rollback_nonfinite", label: "rollback: non-finite steps in a row", min: 1,
      max: 10, step: 1, integer: true },
    { key: "stabilize_threshold", label: "warmup ends: EMA drop per window below", min: 1e-4,
      max: 0.5, log: true, digits: 2, format: (v) => `${S.format.percent(v, 2)}` },
    { key: "min_warmup", label: "min warmup (steps)", min: 0, step: 1, integer: true },
    { key: "max_warmup", label: "max warmup (steps)", min: 0, step: 1, integer: true },
    { key: "plateau_patience", label: "plateau: patience (steps)", min: 1, step: 1,
      integer: true },
    { key: "plateau_min_delta", label: "plateau: min relative improvement", min: 0,
      max: 0.05, step: 0.0005, format: (v) => `${S.format.percent(v, 2)}` },
    { key: "min_lr_ratio", label: "floor (x peak)", min: 0, max: 1, step: 0.01 },
  ];

  function replay_mode() {
    const run = data.settings;
    const initial = { ...run.config };
    const config = { ...initial };
    const losses = data.losses;
    const page = (window.surgeonPage = { mode: "replay", config, lr_scales: [], events: [],
                                         steps: data.steps, marker: null, error: null,
                                         rerun: null });
    const note = data.stride > 1 ? ` Logged every ${data.stride} steps: lengths count ` +
      "logged points." : "";
    $("source").textContent = `${data.source}: ${losses.length} losses, planned length ` +
      `${run.total_steps} steps, losses read ${run.readback_every} at a time, snapshots ` +
      `${run.snapshots ? "on" : "off"}.${note}`;
    const controls = $("controls");
    const ctl = {};
    for (const spec of REPLAY_SLIDERS) {
      const full = { max: run.total_steps, ...spec };
      ctl[spec.key] = slider(controls, full, config[spec.key], (v) => {
        config[spec.key] = v;
        if (spec.key === "min_warmup" && config.max_warmup < v) {
          ctl.max_warmup.set((config.max_warmup = v));
        }
        if (spec.key === "max_warmup" && config.min_warmup > v) {
          ctl.min_warmup.set((config.min_warmup = v));
        }
        update();
      });
    }
    const selects = {
      decay: select(controls, "decay", "decay shape", SHAPES, config.decay, (v) => {
        config.decay = v;
        update();
      }),
      plateau_action: select(controls, "plateau_action", "plateau: action", ["cut", "restart"],
                             config.plateau_action, (v) => {
        config.plateau_action = v;
        update();
      }),
    };
    let marker = losses.length - 1;
    slider(controls, { key: "marker", label: "read the step", min: 0, max: losses.length - 1,
                       step: 1, integer: true, format: (i) => `step ${data.steps[i]}` },
           marker, (v) => {
      marker = v;
      render();
    });
    const reset = document.createElement("button");
    reset.textContent = "reset to the run's settings";
    reset.addEventListener("click", () => {
      Object.assign(config, initial);
      for (const spec of REPLAY_SLIDERS) ctl[spec.key].set(config[spec.key]);
      for (const [key, input] of Object.entries(selects)) input.value = config[key];
      update();
    });
    controls.append(reset);

    let result = null;
    function update() {
      try {
        result = S.replay.replay(losses, { ...run, config }, {
          update_skipped: data.update_skipped,
          steps: data.steps,
          passed: data.passed,
          checkpoints: data.checkpoints,
          end_read: data.end_read,
        });
        page.error = null;
        $("error").textContent = "";
      } catch (err) {
        page.error = err.message;
        $("error").textContent = err.message;
        return;
      }
      page.lr_scales = result.lr_scales;
      page.events = result.events;
      render();
      table(result.events);
    }
    page.rerun = update;

    function render() {
      const steps = result.steps;
      const spans = [];
      result.phases.forEach((phase, i) => {
        const last = spans[spans.length - 1];
        if (last && last[0] === phase) last[2] = steps[i];
        else spans.push([phase, last ? last[2] : steps[i], steps[i]]);
      });
      const counts = {};
      for (const e of result.events) counts[e.kind] = (counts[e.kind] || 0) + 1;
      legend([
        ["loss", "#1f77b4"],
        ["smoothed loss", "#ff7f0e"],
        ["replayed LR scale", "#264653"],
        ...Object.entries(counts).map(([k, n]) => [`${k} (${n})`, data.colors.events[k] ||
                                                                  "#555555"]),
      ]);
      const i = marker;
      page.marker = { index: i, step: steps[i], loss: result.losses[i],
                      lr_scale: result.lr_scales[i], phase: result.phases[i] };
      $("readout").textContent =
        `step ${steps[i]}: loss ${fmt(result.losses[i])}, smoothed ${fmt(result.smooth[i])}, ` +
        `LR scale ${fmt(result.lr_scales[i])}` +
        (data.peak_lr ? ` (LR ${fmt(result.lr_scales[i] * data.peak_lr, 3)})` : "") +
        `, phase ${result.phases[i]}`;
      draw({
        x_range: [steps[0], steps[steps.length - 1]],
        colors: data.colors,
        phases: spans,
        events: result.events,
        panels: [
          { top: 10, height: 250, y_label: "training loss", log: true,
            series: [
              { xs: steps, ys: result.losses, color: "#1f77b4", width: 0.8, opacity: 0.5,
                id: "loss-curve" },
              { xs: steps, ys: result.smooth, color: "#ff7f0e", width: 1.5,
                id: "smooth-curve" },
            ] },
          { top: 280, height: 200, y_label: "LR scale", log: false,
            series: [{ xs: steps, ys: result.lr_scales, color: "#264653", width: 2,
                       id: "lr-curve" }] },
        ],
        marker: { step: steps[i], value: result.lr_scales[i] },
      });
    }

    function table(events) {
      // compared up to the run's first decision made outside the losses (logged_until)
      const until = data.logged_until || null;
      const compared = until === null ? events : events.filter((e) => e.step < until[0]);
      const same = data.logged_events !== null &&
        JSON.stringify(compared.map((e) => [e.step, e.kind])) ===
        JSON.stringify(data.logged_events);
      const upto = until === null ? "" : ` up to its ${until[1]} at step ${until[0]}`;
      $("summary").textContent = `${events.length} events` + (data.logged_events === null ? ""
        : same ? ` (the same as the run logged${upto})`
        : ` (the run logged ${data.logged_events.length}${upto})`);
      const body = $("event-table").tBodies[0];
      body.replaceChildren();
      for (const e of events) {
        const row = body.insertRow();
        row.className = `event-row event-${e.kind}`;
        const cells = [
          [String(e.step), "num"],
          [e.kind, ""],
          [e.phase || "", ""],
          [`${fmt(e.scale_before, 3)} → ${fmt(e.scale_after, 3)}`, "num"],
          [e.reason, ""],
        ];
        for (const [text, cls] of cells) {
          const cell = row.insertCell();
          cell.textContent = text;
          if (cls) cell.className = cls;
        }
        row.cells[1].style.color = data.colors.events[e.kind] || "#555555";
      }
    }
    update();
  }

  if (data.mode === "preview") preview();
  else replay_mode();
})((globalThis.surgeon ||= {}));
