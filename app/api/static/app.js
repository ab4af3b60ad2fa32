/* ftaas dashboard: a hash-routed single page over the JSON API. Plain JS, no build step.
 *   #/                jobs table (polled every 2 s)
 *   #/jobs/<id>       one job: progress, live loss curve (EventSource on /jobs/<id>/events), details, cancel
 *   #/new             new-job form (newjob.js: upload a file or pick an uploaded dataset; the API's defaults)
 *   #/playground      one prompt, base model and adapter side by side (two POST /generate calls)
 */
"use strict";
(function () {
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const EVENT_TYPES = ["queued", "started", "phase", "dataset_stats", "step", "eval", "cancel_requested",
    "adapter_saved", "succeeded", "failed", "cancelled"];
  const Fmt = window.Fmt;
  const view = document.getElementById("view");

  // -- helpers --------------------------------------------------------------------------------------
  /** Build an element: h("td", {class: "x", onclick: fn}, "text", otherNode, [more]). Text is never parsed as HTML. */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else if (k === "value") node.value = v;
      else if (k === "checked" || k === "selected" || k === "disabled") node[k] = !!v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  class ApiError extends Error {
    constructor(status, code, message, field) {
      super(message);
      this.status = status; this.code = code; this.field = field || null;
    }
  }

  // -- API key (when the server has keys on): pasted once, kept in this browser's localStorage ----------
  const KEY_STORE = "ftaas.apiKey";
  function apiKey() {
    try { return localStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
  }
  function askForKey() {
    const key = window.prompt("API key for this server (kept in this browser's localStorage; empty to forget it)",
      apiKey());
    if (key === null) return;
    try {
      if (key.trim()) localStorage.setItem(KEY_STORE, key.trim()); else localStorage.removeItem(KEY_STORE);
    } catch (_) { /* storage refused: the key lasts until the page is left */ }
    window.location.reload();
  }
  function authHeaders() {
    const key = apiKey();
    return key ? { authorization: "Bearer " + key } : {};
  }

  /** A live SSE stream read with fetch, so the key can go in a header (EventSource cannot send one).
   *  Calls onEvent({type, data, lastEventId}) per frame; returns {close()}. */
  function keyedEventStream(path, onEvent, onEnd) {
    const ctrl = new AbortController();
    (async () => {
      try {
        const resp = await fetch(path, { headers: { accept: "text/event-stream", ...authHeaders() }, signal: ctrl.signal });
        if (!resp.ok || !resp.body) return;
        const reader = resp.body.getReader(), dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const frame = { type: "message", data: "", lastEventId: "" };
            buf.slice(0, cut).split("\n").forEach((line) => {
              if (line.startsWith(":")) return;
              const i = line.indexOf(":"), k = i < 0 ? line : line.slice(0, i), v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (k === "data") frame.data += (frame.data ? "\n" : "") + v;
              else if (k === "event") frame.type = v;
              else if (k === "id") frame.lastEventId = v;
            });
            buf = buf.slice(cut + 2);
            if (frame.data) onEvent(frame);
          }
        }
      } catch (_) { /* aborted or dropped: the page's poll keeps it current */ }
      if (onEnd) onEnd();
    })();
    return { close: () => ctrl.abort() };
  }

  /** Call the API; a non-2xx answer throws ApiError from the {"error": {code, message, field}} envelope. */
  async function api(method, path, body) {
    const init = { method, headers: { accept: "application/json", ...authHeaders() } };
    if (body instanceof FormData) init.body = body;
    else if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "network_error", "the API did not answer (" + e.message + ")");
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) {
      const err = data && data.error;
      if (resp.status === 401 && err) {
        throw new ApiError(401, err.code, err.message + " (this server needs an API key: use the 'API key' button at the top)", err.field);
      }
      if (err && err.message) throw new ApiError(resp.status, err.code, err.message, err.field);
      throw new ApiError(resp.status, "http_" + resp.status, (text || resp.statusText).slice(0, 300));
    }
    return data;
  }

  function errorText(err) {
    if (err instanceof ApiError) {
      const bits = [err.code, err.field ? "field " + err.field : null, err.status ? "HTTP " + err.status : null];
      return err.message + " (" + bits.filter(Boolean).join(", ") + ")";
    }
    return String(err && err.message ? err.message : err);
  }
  function showError(box, err) { box.textContent = err ? errorText(err) : ""; }
  function errorBox() { return h("div", { class: "error", role: "alert", "data-testid": "error" }); }

  function badge(status) { return h("span", { class: "badge " + status, "data-testid": "status" }, status); }
  function bar(fraction, big) {
    const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
    return h("div", { class: "bar" + (big ? " big" : ""), role: "progressbar", "aria-valuenow": pct.toFixed(0),
      "aria-valuemin": 0, "aria-valuemax": 100 }, h("span", { style: `width:${pct}%` }));
  }
  const num = Fmt.sig;  // 4 significant digits; integers (ids, seeds) without thousands separators
  function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "–"; }
  function secs(s) { return s === null || s === undefined ? "–" : Fmt.duration(s); }

  /** The base models the API reports (GET /v1/models, less the fine-tuned ``ft:`` ones). */
  let baseModelsCache = null;
  function baseModels() {
    if (!baseModelsCache) {
      baseModelsCache = api("GET", "/v1/models").then((r) => r.data.map((m) => m.id).filter((id) => !id.startsWith("ft:")))
        .catch((e) => { baseModelsCache = null; throw e; });
    }
    return baseModelsCache;
  }
  /** Fill a <datalist> (and a hint element) with the API's base models. */
  function showBaseModels(datalist, hint, onError) {
    baseModels().then((names) => {
      datalist.replaceChildren(...names.map((m) => h("option", { value: m })));
      if (hint) { hint.textContent = names.join(", "); hint.setAttribute("data-loaded", "true"); }
    }).catch(onError);
  }
  function kvTable(obj, testid, empty) {
    const rows = Object.entries(obj || {}).filter(([, v]) => v !== null && v !== undefined).map(([k, v]) =>
      h("tr", {}, h("th", {}, k), h("td", { class: "mono" },
        typeof v === "object" ? Fmt.json(v) : typeof v === "number" ? num(v) : String(v))));
    return rows.length ? h("table", { class: "kv", "data-testid": testid }, h("tbody", {}, rows))
      : h("p", { class: "muted", "data-testid": testid }, empty || "none yet");
  }
  function card(title, ...children) { return h("section", { class: "card" }, title ? h("h2", {}, title) : null, children); }

  // -- jobs table -----------------------------------------------------------------------------------
  function jobsPage() {
    const err = errorBox();
    const filter = h("select", { "aria-label": "status filter", onchange: () => load() },
      h("option", { value: "" }, "all statuses"), [...["queued", "running"], ...TERMINAL].map((s) => h("option", { value: s }, s)));
    const tbody = h("tbody", {});
    const more = h("p", { class: "muted" });
    view.replaceChildren(
      h("div", { class: "toolbar" }, h("h1", {}, "Jobs"), filter, h("span", { class: "spacer" }),
        h("a", { href: "#/new" }, h("button", { type: "button" }, "New job"))),
      err,
      h("div", { class: "card" }, h("table", { "data-testid": "jobs-table" },
        h("thead", {}, h("tr", {}, ["Job", "Name", "Base model", "Status", "Progress", "Loss", "Created"].map((t) => h("th", {}, t)))),
        tbody), more));
    let timer = null, alive = true;
    async function load() {
      clearTimeout(timer);
      try {
        const q = filter.value ? "&status=" + encodeURIComponent(filter.value) : "";
        const page = await api("GET", "/jobs?limit=50" + q);
        if (!alive) return;
        showError(err, null);
        tbody.replaceChildren(...page.data.map((j) => h("tr", { "data-job": j.id },
          h("td", {}, h("a", { href: "#/jobs/" + j.id, class: "mono" }, j.id)),
          h("td", {}, j.name || ""),
          h("td", { class: "mono" }, j.request.base_model),
          h("td", {}, badge(j.status)),
          h("td", {}, bar(j.progress.fraction), h("small", { class: "muted" },
            (!TERMINAL.has(j.status) && Fmt.phaseText(j.progress)) || `${j.progress.step} / ${j.progress.total_steps}`)),
          h("td", { class: "mono" }, num(j.metrics && j.metrics.loss)),
          h("td", {}, when(j.created_at)))));
        if (!page.data.length) tbody.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted" },
          "No jobs yet. ", h("a", { href: "#/new" }, "Create one"), ".")));
        more.textContent = page.has_more ? "Showing the newest 50 jobs." : "";
      } catch (e) {
        if (alive) showError(err, e);
      }
      if (alive) timer = setTimeout(load, 2000);
    }
    load();
    return () => { alive = false; clearTimeout(timer); };
  }

  // -- one job --------------------------------------------------------------------------------------
  function jobPage(jobId) {
    let job = null, alive = true, es = null, pollTimer = null, debounce = null;
    const points = new Map(); // "train:<step>" / "eval:<step>" -> metric point
    const activity = [];
    const err = errorBox();
    const head = h("div", { class: "toolbar" });
    const body = h("div", {});
    const chartBox = h("div", { class: "chart", "data-testid": "loss-chart" });
    const chartInfo = h("small", { class: "muted", "data-testid": "chart-info" });
    const chartCard = card("Loss", chartBox, h("div", { class: "legend" },
      h("span", {}, h("i", { style: "background:var(--train)" }), "train loss"),
      h("span", {}, h("i", { style: "background:var(--eval)" }), "eval loss"),
      h("span", { class: "spacer" }), chartInfo));
    view.replaceChildren(head, err, body);

    function addPoint(p) {
      if (!p || typeof p.step !== "number") return;
      if (p.loss !== null && p.loss !== undefined) points.set("train:" + p.step, p);
      if (p.eval_loss !== null && p.eval_loss !== undefined) points.set("eval:" + p.step, p);
    }
    function drawChart() {
      const all = [...points.values()];
      const train = all.filter((p) => p.loss !== null && p.loss !== undefined).map((p) => [p.step, p.loss]);
      const evals = all.filter((p) => p.eval_loss !== null && p.eval_loss !== undefined).map((p) => [p.step, p.eval_loss]);
      train.sort((a, b) => a[0] - b[0]); evals.sort((a, b) => a[0] - b[0]);
      const total = job ? job.progress.total_steps : undefined;
      const drawn = window.LossChart.render(chartBox, [
        { name: "train loss", cls: "train", points: train },
        { name: "eval loss", cls: "eval", points: evals }],
      { xmin: 0, xmax: total, label: "loss curve", empty: job && TERMINAL.has(job.status) ? "no metrics were recorded" : "waiting for the first step…" });
      chartBox.setAttribute("data-points", String(drawn));
      chartInfo.textContent = `${train.length} train point${train.length === 1 ? "" : "s"}, ${evals.length} eval point${evals.length === 1 ? "" : "s"}`;
    }

    function render() {
      if (!job) return;
      const running = !TERMINAL.has(job.status);
      const cancelBtn = running ? h("button", { class: "danger", type: "button", "data-testid": "cancel",
        disabled: job.cancel_requested, onclick: cancel }, job.cancel_requested ? "Cancelling…" : "Cancel job") : null;
      head.replaceChildren(h("h1", {}, job.name || "Job"), h("code", {}, job.id), badge(job.status),
        h("span", { class: "spacer" }),
        job.status === "succeeded" ? h("a", { href: "#/playground?adapter=" + job.id }, h("button", { type: "button", class: "secondary" }, "Try in playground")) : "",
        cancelBtn || "");
      const p = job.progress, m = job.metrics || {};
      // a record with phases says what the job is doing; an older one only its step count
      const phase = running ? Fmt.phaseText(p) : null;
      const steps = `step ${p.step} / ${p.total_steps} (${Math.round((p.fraction || 0) * 100)}%)`;
      const pp = p.phase_progress;
      const progress = card("Progress",
        bar(p.fraction, true),
        h("p", { "data-testid": "progress-text", "data-phase": running && p.phase ? p.phase : null },
          h("span", { "data-testid": "phase" }, phase || steps),
          phase && p.phase !== "training" && p.step ? ` · ${steps}` : "",
          phase ? h("span", { "data-testid": "eta" }, ` · ETA ${Fmt.eta(p.eta_seconds)}`)
            : running && p.eta_seconds !== null && p.eta_seconds !== undefined ? ` · ETA ${secs(p.eta_seconds)}` : "",
          m.loss !== null && m.loss !== undefined ? ` · loss ${num(m.loss)}` : "",
          m.learning_rate ? ` · lr ${num(m.learning_rate)}` : ""),
        phase && pp && pp.total ? bar(pp.done / pp.total) : null,
        h("small", { class: "muted" }, `created ${when(job.created_at)} · started ${when(job.started_at)} · finished ${when(job.finished_at)}`,
          job.adapter ? ` · adapter ${job.adapter}` : ""));
      const failure = job.error ? h("div", { class: "error", role: "alert", "data-testid": "job-error" },
        `The job ${job.status}: ${job.error.message} (${job.error.code})`) : null;
      const req = job.request || {};
      const hp = Object.assign({}, req.hyperparameters || {});
      const setup = { base_model: req.base_model, dataset: req.dataset, format: req.format, template: req.template,
        validation: req.validation, sample_prompts: req.sample_prompts };
      const ev = job.evaluation;
      const evalCard = card("Evaluation", ev ? [
        kvTable({ eval_loss_before: ev.eval_loss_before, eval_loss_after: ev.eval_loss_after,
          relative_change: ev.relative_change === null || ev.relative_change === undefined ? null
            : (ev.relative_change * 100).toFixed(1) + " %" }, "evaluation",
        "no eval loss: the job has no validation rows"),
        ev.samples && ev.samples.length ? h("table", { "data-testid": "samples" },
          h("thead", {}, h("tr", {}, h("th", {}, "prompt"), h("th", {}, "before"), h("th", {}, "after"))),
          h("tbody", {}, ev.samples.map((s) => h("tr", {}, h("td", { class: "mono" }, s.prompt),
            h("td", { class: "mono" }, s.before), h("td", { class: "mono" }, s.after === null ? "–" : s.after))))) : null,
      ] : h("p", { class: "muted" }, running ? "measured before and after training" : "none"));
      const log = card("Activity", activity.length ? h("table", {}, h("tbody", {}, activity.slice(-12).reverse().map((e) =>
        h("tr", {}, h("td", { class: "nowrap" }, new Date(e.time * 1000).toLocaleTimeString()), h("td", { class: "nowrap" }, e.type),
          h("td", { "data-testid": "event-line" }, Fmt.eventLine(e).slice(0, 240))))))
        : h("p", { class: "muted" }, "no events"));
      body.replaceChildren(failure || "", progress, chartCard,
        h("div", { class: "grid" }, card("Hyperparameters", kvTable(hp, "hyperparameters")),
          card("Dataset", kvTable(job.dataset_stats, "dataset-stats"), h("h2", { style: "margin-top:1rem" }, "Request"), kvTable(setup, "setup"))),
        h("div", { style: "height:1rem" }), evalCard, log);
      drawChart();
    }

    async function loadJob(withMetrics) {
      try {
        const [j, series] = await Promise.all([api("GET", "/jobs/" + jobId),
          withMetrics ? api("GET", `/jobs/${jobId}/metrics`) : Promise.resolve(null)]);
        if (!alive) return;
        job = j;
        if (series) series.data.forEach(addPoint);
        showError(err, null);
        render();
        if (TERMINAL.has(job.status)) stopLive();
      } catch (e) {
        if (alive) showError(err, e);
      }
    }
    function scheduleJob() {
      clearTimeout(debounce);
      debounce = setTimeout(() => loadJob(false), 250);
    }
    function stopLive() {
      if (es) { es.close(); es = null; }
      clearInterval(pollTimer); pollTimer = null;
    }
    function onEvent(msg) {
      let e;
      try { e = JSON.parse(msg.data); } catch (_) { return; }
      if (activity.some((a) => a.id === e.id)) return;
      activity.push(e);
      if (e.type === "phase") {
        if (job && e.data && e.data.phase) {
          job.progress.phase = e.data.phase;
          job.progress.phase_progress = typeof e.data.done === "number" && typeof e.data.total === "number"
            ? { done: e.data.done, total: e.data.total } : null;
          if ("eta_seconds" in e.data) job.progress.eta_seconds = e.data.eta_seconds;
          render();
        }
        scheduleJob();
      } else if (e.type === "step" || e.type === "eval") {
        addPoint(e.data);
        if (job && e.type === "step") {
          if (job.progress.phase) { job.progress.phase = "training"; job.progress.phase_progress = null; }
          job.progress.step = e.data.step;
          if ("eta_seconds" in e.data) job.progress.eta_seconds = e.data.eta_seconds;
          job.progress.total_steps = e.data.total_steps || job.progress.total_steps;
          job.progress.fraction = job.progress.total_steps ? e.data.step / job.progress.total_steps : 0;
          if (e.data.loss !== undefined) job.metrics.loss = e.data.loss;
        }
        if (job) render();
        scheduleJob();
      } else if (TERMINAL.has(e.type)) {
        if (es) { es.close(); es = null; }
        loadJob(true);
      } else {
        scheduleJob();
      }
    }
    async function cancel() {
      try {
        job = await api("POST", `/jobs/${jobId}/cancel`);
        showError(err, null);
        render();
      } catch (e) { showError(err, e); }
    }

    (async () => {
      await loadJob(true);
      if (!alive || !job) return;
      // the event log so far, once, for the activity list; the live stream then starts after it, so old
      // phases and steps are not replayed over the record's current progress
      let last = null;
      try {
        const page = await api("GET", `/jobs/${jobId}/events?limit=1000`);
        page.data.forEach((e) => { if (!activity.some((a) => a.id === e.id)) activity.push(e); });
        if (page.data.length && !page.has_more) last = page.data[page.data.length - 1].id;
        render();
      } catch (_) { /* the page still shows the job */ }
      if (!alive || TERMINAL.has(job.status)) return;
      const stream = `/jobs/${jobId}/events` + (last ? "?after=" + encodeURIComponent(last) : "");
      if (apiKey()) {  // EventSource cannot send the key: read the stream with fetch
        es = keyedEventStream(stream, (f) => { if (EVENT_TYPES.includes(f.type)) onEvent(f); });
      } else {
        es = new EventSource(stream);
        EVENT_TYPES.forEach((t) => es.addEventListener(t, onEvent));
        es.onerror = () => { if (job && TERMINAL.has(job.status) && es) { es.close(); es = null; } };
      }
      // a fallback in case a proxy buffers the stream
      pollTimer = setInterval(() => loadJob(true), 5000);
    })();
    return () => { alive = false; clearTimeout(debounce); stopLive(); };
  }

  // -- new job form ---------------------------------------------------------------------------------
  function newJobPage() {
    return window.NewJob.page(view, { h, api, showError, errorBox, when, showBaseModels });
  }

  // -- playground -----------------------------------------------------------------------------------
  function playgroundPage(query) {
    const params = new URLSearchParams(query || "");
    const err = errorBox();
    const prompt = h("textarea", { name: "prompt", "data-testid": "prompt" }, "Quote: Imagination is more");
    const adapter = h("select", { name: "adapter", "data-testid": "adapter" }, h("option", { value: "" }, "none (base model only)"));
    const baseModel = h("input", { type: "text", name: "base_model", list: "pg-base-models", placeholder: "server default", "data-testid": "pg-base-model" });
    const maxNew = h("input", { type: "number", name: "max_new_tokens", min: 1, max: 1024, value: "32", "data-testid": "max-new-tokens" });
    const button = h("button", { type: "submit", "data-testid": "generate" }, "Generate");
    const pgBaseList = h("datalist", { id: "pg-base-models" });
    showBaseModels(pgBaseList, null, (e) => showError(err, e));
    const panes = {};
    const paneCard = (key, title) => {
      const label = h("h2", {}, title);
      const text = h("div", { class: "pane", "data-testid": key + "-output" });
      const meta = h("small", { class: "muted", "data-testid": key + "-meta" });
      const perr = errorBox();
      panes[key] = { label, text, meta, err: perr };
      return h("section", { class: "card" }, label, text, meta, perr);
    };
    let succeeded = [];
    async function loadAdapters() {
      try {
        const page = await api("GET", "/jobs?status=succeeded&limit=100");
        succeeded = page.data;
        const want = params.get("adapter");
        adapter.replaceChildren(h("option", { value: "" }, "none (base model only)"),
          ...succeeded.map((j) => h("option", { value: j.id, selected: j.id === want },
            `${j.name ? j.name + " · " : ""}${j.id} · ${j.request.base_model}`)));
        if (want && !succeeded.some((j) => j.id === want)) showError(err, new Error(`${want} is not a succeeded job, so it has no adapter.`));
        syncBase();
      } catch (e) { showError(err, e); }
    }
    function syncBase() {
      const j = succeeded.find((x) => x.id === adapter.value);
      baseModel.disabled = !!j;
      if (j) baseModel.value = j.request.base_model;
      panes.adapter.label.textContent = j ? "Adapter " + j.id : "Adapter";
      panes.base.label.textContent = "Base model" + (j || baseModel.value ? " " + (j ? j.request.base_model : baseModel.value) : "");
    }
    adapter.addEventListener("change", syncBase);
    baseModel.addEventListener("input", syncBase);

    async function run(key, body) {
      const p = panes[key];
      showError(p.err, null);
      p.text.textContent = ""; p.meta.textContent = "generating…";
      try {
        const out = await api("POST", "/generate", body);
        const o = out.outputs[0];
        p.text.replaceChildren(h("span", { class: "prompt" }, body.prompt), h("span", { class: "completion", "data-testid": key + "-completion" }, o.text));
        p.meta.textContent = `${o.tokens} tokens · ${o.finish_reason} · ${out.base_model}${out.adapter ? " + " + out.adapter : ""} · ${Math.round(out.timing.total_ms)} ms`;
        p.text.setAttribute("data-done", "true");
      } catch (e) {
        p.meta.textContent = "";
        showError(p.err, e);
        p.text.setAttribute("data-done", "error");
      }
    }
    async function onSubmit(ev) {
      ev.preventDefault();
      showError(err, null);
      Object.values(panes).forEach((p) => p.text.removeAttribute("data-done"));
      const text = prompt.value;
      const n = parseInt(maxNew.value, 10);
      const common = { prompt: text, max_new_tokens: Number.isNaN(n) ? 32 : n };
      const j = succeeded.find((x) => x.id === adapter.value);
      button.disabled = true;
      const base = Object.assign({}, common);
      if (j) base.base_model = j.request.base_model;
      else if (baseModel.value.trim()) base.base_model = baseModel.value.trim();
      const calls = [run("base", base)];
      if (j) calls.push(run("adapter", Object.assign({ adapter: j.id }, common)));
      else {
        panes.adapter.text.textContent = "";
        panes.adapter.meta.textContent = "pick an adapter (a succeeded job) to compare";
      }
      await Promise.all(calls);
      button.disabled = false;
    }

    view.replaceChildren(h("h1", {}, "Playground"), err,
      h("form", { class: "card", onsubmit: onSubmit, "data-testid": "playground-form" },
        h("div", { class: "row" }, h("label", {}, "Prompt"), prompt),
        pgBaseList,
        h("div", { class: "inline" },
          h("div", { class: "row" }, h("label", {}, "Adapter"), adapter),
          h("div", { class: "row" }, h("label", {}, "Base model (without adapter)"), baseModel),
          h("div", { class: "row" }, h("label", {}, "max_new_tokens"), maxNew)),
        button),
      h("div", { class: "grid" }, paneCard("base", "Base model"), paneCard("adapter", "Adapter")));
    loadAdapters();
    return () => {};
  }

  // -- router ---------------------------------------------------------------------------------------
  let cleanup = () => {};
  function route() {
    cleanup();
    const hash = location.hash || "#/";
    const [path, query] = hash.slice(1).split("?");
    let m, nav;
    if (path === "/" || path === "") { nav = "jobs"; cleanup = jobsPage(); }
    else if ((m = path.match(/^\/jobs\/([A-Za-z0-9_]+)$/))) { nav = "jobs"; cleanup = jobPage(m[1]); }
    else if (path === "/new") { nav = "new"; cleanup = newJobPage(); }
    else if (path === "/playground") { nav = "playground"; cleanup = playgroundPage(query); }
    else {
      nav = "";
      view.replaceChildren(h("h1", {}, "Not found"), h("p", {}, "No page at ", h("code", {}, hash), ". ", h("a", { href: "#/" }, "Back to the jobs"), "."));
      cleanup = () => {};
    }
    document.querySelectorAll("header nav a[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === nav));
    document.title = "ftaas · " + (nav || "not found");
  }
  window.addEventListener("hashchange", route);
  const keyButton = document.getElementById("api-key");
  if (keyButton) {
    keyButton.textContent = apiKey() ? "API key ✓" : "API key";
    keyButton.addEventListener("click", askForKey);
  }
  route();
})();
