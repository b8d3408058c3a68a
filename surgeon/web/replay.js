// Port of surgeon/replay.py's feed and replay: a loss stream through a fresh controller with
// the callback's timing (LR asked when a step starts, losses read in blocks one block late,
// snapshots when due, rollbacks acknowledged at the next step). Reading files is Python's job.
(function (S) {
  "use strict";
  const { Controller } = S.controller;

  function feed(
    controller,
    losses,
    update_skipped,
    { readback_every = 4, snapshots = true, passed = null, checkpoints = [], end_read = true } = {},
  ) {
    const n = losses.length;
    const scales = [];
    const smooth = new Array(n).fill(NaN);
    const phases = new Array(n).fill("");
    let in_flight = [];
    let read_until = 0; // the losses before it were read early, by a checkpoint
    let no_snapshot_at = null; // the step a checkpoint starts at takes no snapshot
    const at_checkpoint = new Set(checkpoints || []);

    function consume(block, now) {
      controller.written_until = now; // the LRs before `now` are written
      for (const i of block) {
        if (passed !== null && passed[i]) { // counted without a loss (its update applied or not)
          controller.pass_step(!update_skipped[i]);
        } else controller.update(losses[i], { update_skipped: update_skipped[i] });
        if (controller.rollback_to !== null) controller.rolled_back(now);
        smooth[i] = controller.spike.mean;
        phases[i] = controller.phase;
      }
    }

    const range = (start, stop) =>
      Array.from({ length: Math.max(0, stop - start) }, (_, k) => start + k);
    function read_all(now, end_of_fit = false) { // a checkpoint or the fit's end
      in_flight.push(range(Math.max(now - (now % readback_every), read_until), now));
      for (const block of in_flight) consume(block, now);
      in_flight = [];
      read_until = now;
      controller.before_checkpoint(end_of_fit); // no loss confirms a spike in the last one
      if (controller.rollback_to !== null) controller.rolled_back(now);
    }
    function checkpoint(now) { // read everything, then drop the snapshots
      no_snapshot_at = now;
      read_all(now);
      if (snapshots) controller.checkpoint_dropped_snapshots(now);
      else controller.snapshots_off();
    }

    if (!snapshots) controller.snapshots_off();
    if (at_checkpoint.has(0)) checkpoint(0);
    for (let step = 0; step < n; step++) {
      scales.push(controller.lr_scale(step));
      if (snapshots && step !== no_snapshot_at && controller.snapshot_due(step)) {
        controller.snapshot_taken(step, 0);
      }
      if ((step + 1) % readback_every === 0) {
        const block = range(Math.max(step + 1 - readback_every, read_until), step + 1);
        if (block.length) in_flight.push(block);
        if (in_flight.length > 1) consume(in_flight.shift(), step + 1);
      }
      if (at_checkpoint.has(step + 1) && (step + 1 < n || !end_read)) checkpoint(step + 1);
    }
    if (end_read) read_all(n, true); // on_train_end: the open block and those in flight
    else { // a fit that raised: its losses on file were read as the next block closed
      for (const block of in_flight) {
        consume(block, block[block.length - 1] + 1 + readback_every);
      }
    }
    return [scales, smooth, phases];
  }

  function replay(
    losses,
    settings,
    { update_skipped = null, steps = null, passed = null, checkpoints = [], end_read = true } = {},
  ) {
    const skipped = update_skipped === null ? losses.map((x) => !Number.isFinite(x))
                                            : update_skipped;
    const at = steps === null ? losses.map((_, i) => i) : steps;
    const lag = 2 * settings.readback_every; // as the callback's engine plans
    const controller = new Controller(settings.total_steps, settings.config, lag);
    const [scales, smooth, phases] = feed(controller, losses, skipped, {
      readback_every: settings.readback_every,
      snapshots: settings.snapshots,
      passed,
      checkpoints,
      end_read,
    });
    const events = controller.events.map((e) =>
      e.step < at.length ? { ...e, step: at[e.step] } : e,
    );
    return { steps: at, losses, lr_scales: scales, smooth, phases, events };
  }

  S.replay = { feed, replay };
})((globalThis.surgeon ||= {}));
