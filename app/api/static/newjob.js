/* The new-job form (#/new). Its fields start from the API's own defaults, read at run time from the
 * OpenAPI schema FastAPI serves (/openapi.json: JobCreate and Hyperparameters), so the form and the API
 * cannot drift apart; a field is sent only when it differs from that default, so an untouched form makes
 * exactly the job an API request without those fields makes. */
"use strict";
(function () {
  /** {job: {template, format, base_model, name}, hp: {max_steps, …}}: the schema's defaults (null where none). */
  async function apiDefaults() {
    const resp = await fetch("/openapi.json", { headers: { accept: "application/json" } });
    if (!resp.ok) throw new Error("could not read the API's defaults (/openapi.json: HTTP " + resp.status + ")");
    const schemas = (await resp.json()).components.schemas;
    const deref = (s) => {
      for (let i = 0; s && i < 10; i++) {
        if (s.$ref) s = schemas[s.$ref.split("/").pop()];
        else if (s.allOf && s.allOf.length === 1) s = s.allOf[0];
        else break;
      }
      return s;
    };
    const defaults = (schema) => Object.fromEntries(Object.entries(schema.properties || {})
      .map(([k, v]) => [k, v.default === undefined ? null : v.default]));
    const job = deref(schemas.JobCreate);
    return { job: defaults(job), hp: defaults(deref(job.properties.hyperparameters)) };
  }

  /** Render the form into ``view``; ``lib`` is app.js's helpers ({h, api, showError, errorBox, when, showBaseModels}). */
  function newJobPage(view, lib) {
    const { h, api, showError, errorBox, when } = lib;
    const err = errorBox();
    const status = h("div", { class: "notice", hidden: true, "data-testid": "form-status" });
    const modeUpload = h("input", { type: "radio", name: "source", value: "upload", checked: true, id: "src-upload" });
    const modePick = h("input", { type: "radio", name: "source", value: "pick", id: "src-pick" });
    const file = h("input", { type: "file", name: "file", accept: ".jsonl,.json,.csv,.parquet", "data-testid": "file" });
    const dsSelect = h("select", { name: "dataset", "data-testid": "dataset-select" }, h("option", { value: "" }, "loading…"));
    const dsInfo = h("small", { class: "muted" });
    const baseModel = h("input", { type: "text", name: "base_model", list: "base-models", placeholder: "server default", "data-testid": "base-model" });
    const baseList = h("datalist", { id: "base-models" });
    const baseHint = h("small", { class: "muted", "data-testid": "base-model-hint" }, "loading the API's models…");
    const numField = (n, step, testid) => h("input", { type: "number", name: n, step: step || "1", "data-testid": testid || "hp-" + n });
    const template = h("textarea", { name: "template", "data-testid": "template" });
    const format = h("select", { name: "format", "data-testid": "format" },
      ["auto", "template", "text", "prompt_completion", "messages"].map((f) => h("option", { value: f }, f)));
    const name = h("input", { type: "text", name: "name", maxlength: 200, placeholder: "optional label", "data-testid": "name" });
    const ckpt = h("input", { type: "checkbox", name: "gradient_checkpointing", "data-testid": "hp-gradient_checkpointing" });
    const extra = h("textarea", { name: "advanced", placeholder: '{"warmup_steps": 2, "lora": {"r": 8}}', "data-testid": "advanced-json" });
    const submit = h("button", { type: "submit", "data-testid": "submit" }, "Create job");
    const row = (label, input, hint) => h("div", { class: "row" }, h("label", {}, label), input, hint ? (hint instanceof Node ? hint : h("small", { class: "muted" }, hint)) : null);

    // hyperparameter fields: [name, input, parse]; max_steps sits with the basics, the rest under "Advanced"
    const hpFields = [["max_steps", numField("max_steps", "1", "max-steps"), parseInt],
      ["batch_size", numField("batch_size"), parseInt], ["gradient_accumulation_steps", numField("gradient_accumulation_steps"), parseInt],
      ["learning_rate", numField("learning_rate", "any"), parseFloat], ["max_length", numField("max_length"), parseInt],
      ["eval_interval", numField("eval_interval"), parseInt]];
    const hpInput = Object.fromEntries(hpFields.map(([k, input]) => [k, input]));
    hpInput.eval_interval.placeholder = "max_steps / 5";
    hpInput.max_steps.min = 1; hpInput.max_steps.max = 10000;

    // defaults from the API; a field the user already changed keeps its value
    let defaults = null;
    const form = h("form", { class: "card", "data-testid": "new-job-form", "data-defaults": "loading" });
    const touched = new Set();
    [...hpFields.map(([, input]) => input), ckpt, template, format].forEach((input) =>
      input.addEventListener("input", () => touched.add(input)));
    const setValue = (input, v) => {
      if (touched.has(input)) return;
      if (input.type === "checkbox") input.checked = !!v; else input.value = v === null || v === undefined ? "" : String(v);
    };
    apiDefaults().then((d) => {
      defaults = d;
      hpFields.forEach(([k, input]) => setValue(input, d.hp[k]));
      setValue(ckpt, d.hp.gradient_checkpointing);
      setValue(template, d.job.template);
      setValue(format, d.job.format);
      form.setAttribute("data-defaults", "loaded");
    }).catch((e) => { form.setAttribute("data-defaults", "error"); showError(err, e); });
    lib.showBaseModels(baseList, baseHint, (e) => { baseHint.textContent = "GET /v1/models failed: " + e.message; });

    function syncMode() {
      file.disabled = !modeUpload.checked;
      dsSelect.disabled = !modePick.checked;
    }
    modeUpload.addEventListener("change", syncMode);
    modePick.addEventListener("change", syncMode);

    let datasets = [];
    async function loadDatasets(selectId) {
      try {
        const page = await api("GET", "/datasets?limit=100");
        datasets = page.data;
        dsSelect.replaceChildren(...(datasets.length ? [] : [h("option", { value: "" }, "no uploaded datasets")]),
          ...datasets.map((d) => h("option", { value: d.id, selected: d.id === selectId },
            `${d.filename || d.id} · ${d.row_count} rows · ${d.id}`)));
        describe();
      } catch (e) { showError(err, e); }
    }
    function describe() {
      const d = datasets.find((x) => x.id === dsSelect.value);
      dsInfo.textContent = d ? `columns: ${d.columns.join(", ")} · format ${d.format} · uploaded ${when(d.created_at)}` : "";
    }
    dsSelect.addEventListener("change", describe);

    /** Only what differs from the API's defaults (all that is filled in when they could not be read). */
    const differs = (v, def) => !defaults || v !== def;
    function hyperparameters() {
      const hp = {};
      for (const [k, input, parse] of hpFields) {
        if (input.value.trim() === "") continue;
        const v = parse(input.value, 10);
        if (Number.isNaN(v)) throw new Error(`${k}: not a number`);
        if (differs(v, defaults && defaults.hp[k])) hp[k] = v;
      }
      if (differs(ckpt.checked, defaults && defaults.hp.gradient_checkpointing)) hp.gradient_checkpointing = ckpt.checked;
      if (extra.value.trim()) {
        let more;
        try { more = JSON.parse(extra.value); } catch (e) { throw new Error("Advanced hyperparameters: not valid JSON (" + e.message + ")"); }
        if (!more || typeof more !== "object" || Array.isArray(more)) throw new Error("Advanced hyperparameters: give a JSON object");
        Object.assign(hp, more);
      }
      return hp;
    }

    async function onSubmit(ev) {
      ev.preventDefault();
      showError(err, null);
      submit.disabled = true;
      try {
        const hp = hyperparameters();
        let datasetId;
        if (modeUpload.checked) {
          if (!file.files.length) throw new Error("Choose a file to upload, or pick an uploaded dataset.");
          status.hidden = false; status.textContent = "Uploading " + file.files[0].name + "…";
          const fd = new FormData();
          fd.append("file", file.files[0]);
          const ds = await api("POST", "/datasets", fd);
          datasetId = ds.id;
          // uploaded once: if creating the job fails, the form now points at the stored copy
          modePick.checked = true; syncMode();
          await loadDatasets(ds.id);
          status.textContent = `Uploaded ${ds.row_count} rows as ${ds.id}. Creating the job…`;
        } else {
          datasetId = dsSelect.value;
          if (!datasetId) throw new Error("Pick an uploaded dataset, or upload a file.");
          status.hidden = false; status.textContent = "Creating the job…";
        }
        const body = { dataset: { id: datasetId }, hyperparameters: hp };
        if (differs(format.value, defaults && defaults.job.format)) body.format = format.value;
        if (baseModel.value.trim()) body.base_model = baseModel.value.trim();
        if (template.value.trim() && differs(template.value, defaults && defaults.job.template)) body.template = template.value;
        if (name.value.trim()) body.name = name.value.trim();
        const job = await api("POST", "/jobs", body);
        location.hash = "#/jobs/" + job.id;
      } catch (e) {
        status.hidden = true;
        showError(err, e);
      } finally {
        submit.disabled = false;
      }
    }
    form.addEventListener("submit", onSubmit);
    form.append(
      h("div", { class: "row" }, h("label", {}, "Dataset"),
        h("div", { class: "inline" }, h("label", { class: "plain", for: "src-upload" }, modeUpload, " upload a file (.jsonl, .json, .csv, .parquet)"),
          h("label", { class: "plain", for: "src-pick" }, modePick, " use an uploaded dataset"))),
      h("div", { class: "inline" }, row("File", file), row("Uploaded dataset", dsSelect, null)),
      dsInfo,
      baseList,
      h("div", { class: "inline" }, row("Base model", baseModel, baseHint), row("Max steps", hpInput.max_steps), row("Name", name)),
      h("div", { class: "inline" }, row("Template", template, "str.format over the row's columns (used when rows have no messages, prompt/completion or text)"),
        row("Format", format)),
      h("details", {}, h("summary", {}, "Advanced hyperparameters"),
        h("div", { class: "inline" }, ["batch_size", "gradient_accumulation_steps", "learning_rate", "max_length", "eval_interval"]
          .map((k) => row(k, hpInput[k]))),
        h("div", { class: "row" }, h("label", { class: "plain" }, ckpt, " gradient_checkpointing")),
        row("More hyperparameters (JSON, merged)", extra)),
      submit);
    view.replaceChildren(h("h1", {}, "New fine-tuning job"), err, status, form);
    syncMode();
    loadDatasets();
    return () => {};
  }

  window.NewJob = { page: newJobPage, apiDefaults };
})();
