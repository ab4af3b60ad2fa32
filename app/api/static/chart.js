/* A small SVG line chart for the loss curve: train loss and eval loss against the step. No dependencies. */
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const W = 720, H = 280, M = { top: 14, right: 18, bottom: 34, left: 56 };

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** A round step near ``raw``: 1, 2 or 5 x 10^k. */
  function niceStep(raw) {
    const k = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / k;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * k;
  }

  /** Evenly spaced round ticks covering [lo, hi]: about ``n`` steps of 1/2/5 x 10^k, from a multiple of the step. */
  function niceTicks(lo, hi, n) {
    let span = hi - lo;
    if (!(span > 0)) { const pad = Math.abs(hi) * 0.1 || 1; lo -= pad; hi += pad; span = hi - lo; }
    const step = niceStep(span / n);
    const start = Math.floor(lo / step + 1e-9), end = Math.ceil(hi / step - 1e-9);
    const out = [];
    // multiples of the step, rounded so 0.1 * 3 reads 0.3
    for (let i = start; i <= end; i++) out.push(Number((i * step).toPrecision(12)));
    return out;
  }

  /** Draw ``series`` ([{name, cls, points: [[x, y], …]}]) into ``container`` (replacing what was there). */
  function render(container, series, opts) {
    opts = opts || {};
    const all = series.flatMap((s) => s.points);
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.label || "chart" });
    const iw = W - M.left - M.right, ih = H - M.top - M.bottom;
    if (!all.length) {
      svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, opts.empty || "no points yet"));
      container.replaceChildren(svg);
      return 0;
    }
    let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
    if (opts.xmax && opts.xmax > x1) x1 = opts.xmax;
    if (opts.xmin !== undefined && opts.xmin < x0) x0 = opts.xmin;
    if (x1 === x0) x1 = x0 + 1;
    const lo = Math.min(...all.map((p) => p[1])), hi = Math.max(...all.map((p) => p[1]));
    const yt = niceTicks(lo, hi, 5);
    const y0 = yt[0], y1 = yt[yt.length - 1];
    const sx = (x) => M.left + ((x - x0) / (x1 - x0)) * iw;
    const sy = (y) => M.top + (1 - (y - y0) / (y1 - y0)) * ih;

    const step = yt.length > 1 ? yt[1] - yt[0] : 1;
    const decimals = Math.max(0, Math.min(10, -Math.floor(Math.log10(step) + 1e-9)));
    for (const y of yt) {
      const py = sy(y);
      svg.appendChild(el("line", { class: "gridline", x1: M.left, x2: W - M.right, y1: py, y2: py }));
      svg.appendChild(el("text", { class: "ytick", x: M.left - 6, y: py + 4, "text-anchor": "end" }, y.toFixed(decimals)));
    }
    const ticks = 4;
    const xt = Math.min(ticks, x1 - x0);
    for (let i = 0; i <= xt; i++) {
      const x = x0 + ((x1 - x0) * i) / xt;
      svg.appendChild(el("text", { x: sx(x), y: H - M.bottom + 16, "text-anchor": "middle" },
        Number.isInteger(x) ? String(x) : x.toFixed(1)));
    }
    svg.appendChild(el("line", { class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom }));
    svg.appendChild(el("line", { class: "axis", x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom }));
    svg.appendChild(el("text", { x: M.left + iw / 2, y: H - 4, "text-anchor": "middle" }, opts.xlabel || "step"));

    let drawn = 0;
    for (const s of series) {
      if (!s.points.length) continue;
      const g = el("g", { class: "series " + s.cls, "data-series": s.cls });
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      g.appendChild(el("path", { class: "line " + s.cls, d }));
      for (const p of s.points) {
        const c = el("circle", { class: s.cls, cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 3.5 });
        c.appendChild(el("title", {}, `${s.name} at step ${p[0]}: ${p[1].toFixed(4)}`));
        g.appendChild(c);
        drawn++;
      }
      svg.appendChild(g);
    }
    container.replaceChildren(svg);
    return drawn;
  }

  window.LossChart = { render, niceTicks };
})();
