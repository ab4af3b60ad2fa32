/* Text for people: numbers to 4 significant digits, a job's phase in words, one readable line per event.
 * No DOM here; app.js builds the page from these strings. */
"use strict";
(function () {
  /** A number as people read it: integers as they are (ids and seeds, so no thousands separators),
   *  other numbers to 4 significant digits (0.0002, 2.346, 1.235e-7). Other values: String(v). */
  function sig(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v !== "number") return String(v);
    if (!Number.isFinite(v) || Number.isInteger(v)) return String(v);
    return String(Number(v.toPrecision(4)));
  }

  /** A JSON value with every non-integer number rounded to 4 significant digits. */
  function json(v) {
    return JSON.stringify(v, (_, x) => (typeof x === "number" && !Number.isInteger(x) && Number.isFinite(x)
      ? Number(x.toPrecision(4)) : x));
  }

  const PHASES = {
    queued: "Queued",
    preparing_data: "Preparing the data",
    loading_model: "Loading the model",
    evaluating_before: "Evaluating before training",
    sampling_before: "Sampling before training",
    training: "Training",
    evaluating_after: "Evaluating after training",
    sampling_after: "Sampling after training",
    saving: "Saving the adapter",
  };

  /** "Evaluating before training (3/8)", "Training step 4 / 12"; null when the phase is unknown
   *  (a record from before phases were reported: the caller shows the plain step count). */
  function phaseText(progress) {
    const phase = progress && progress.phase;
    if (!phase || !(phase in PHASES)) return null;
    if (phase === "training") {
      return progress.total_steps ? `Training step ${progress.step || 0} / ${progress.total_steps}` : "Training";
    }
    const pp = progress.phase_progress;
    const part = pp && typeof pp.done === "number" && typeof pp.total === "number" && pp.total > 0
      ? ` (${pp.done}/${pp.total})` : "";
    return PHASES[phase] + part;
  }

  function duration(s) {
    if (s < 90) return Math.max(0, Math.round(s)) + " s";
    const m = Math.floor(s / 60);
    if (m < 90) return m + " min " + Math.round(s % 60) + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  /** The whole remaining job: a duration once there is a measured rate, "estimating…" before. */
  function eta(seconds) {
    return seconds === null || seconds === undefined || !Number.isFinite(seconds) ? "estimating…" : duration(seconds);
  }

  const FIRST = ["loss", "eval_loss", "learning_rate", "grad_norm"];
  /** "k v · k v" over ``data`` less ``skip``: the metrics first, the time as "12.3 s in", objects as rounded JSON. */
  function pairs(data, skip) {
    const entries = Object.entries(data || {}).filter(([k, v]) => !skip.includes(k) && v !== undefined
      && (v !== null || k === "eta_seconds"));
    const rank = (k) => (FIRST.includes(k) ? FIRST.indexOf(k) : FIRST.length);
    entries.sort((a, b) => rank(a[0]) - rank(b[0]));
    return entries.map(([k, v]) => (k === "time" && typeof v === "number" ? `${sig(v)} s in`
      : k === "eta_seconds" ? `ETA ${eta(v)}`
      : `${k} ${typeof v === "object" ? json(v) : sig(v)}`)).join(" · ");
  }

  /** One readable line for a job event ({type, data}). */
  function eventLine(e) {
    const d = e.data || {};
    switch (e.type) {
      case "step": {
        const head = `step ${d.step}${d.total_steps ? " / " + d.total_steps : ""}`;
        const rest = pairs(d, ["step", "total_steps"]);
        return rest ? head + " · " + rest : head;
      }
      case "eval": return `eval loss ${sig(d.eval_loss)} at step ${d.step}` +
        (pairs(d, ["step", "eval_loss"]) ? " · " + pairs(d, ["step", "eval_loss"]) : "");
      case "phase": {
        const text = phaseText({ phase: d.phase, step: d.done, total_steps: d.total,
          phase_progress: typeof d.done === "number" ? { done: d.done, total: d.total } : null });
        const rest = pairs(d, ["phase", "done", "total"]);
        return text ? text + (rest ? " · " + rest : "") : pairs(d, []);
      }
      default: return pairs(d, []);
    }
  }

  window.Fmt = { sig, json, phaseText, eta, duration, eventLine, PHASES };
})();
