"""A running job's page in a real browser (chromium via Playwright, fixtures from test_dashboard.py):
it says which phase the job is in (the evaluation before training, then the training steps) with an
ETA that reads "estimating…" until there is a rate, and once the job is done its page reads well:
activity lines with rounded numbers, the template's newline kept, the seed without separators, round
y-axis ticks on the loss chart.

The page records every text its progress line shows (a MutationObserver added before the page's own
scripts), so a phase that lasts less than a poll interval is still seen, in order.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, expect

from app.core.jobs import DEFAULT_TEMPLATE
from tests.api.test_dashboard import browser, page  # noqa: F401  (fixtures)

SEED = 1614806677
#: Every text of the progress line, in the order the page showed them.
RECORD_PROGRESS = """
window.__progress = [];
new MutationObserver(() => {
  const el = document.querySelector('[data-testid="progress-text"]');
  const seen = window.__progress;
  if (el && seen[seen.length - 1] !== el.textContent) seen.push(el.textContent);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""
ETA = re.compile(r"ETA (estimating…|\d+ s|\d+ min \d+ s|\d+ h \d+ min)(?: ·|$)")


def _job(quotes: list[dict[str, Any]]) -> dict[str, Any]:
    """tiny-gemma, 6 steps, with 40 validation rows: an evaluation before and after training."""
    return {"base_model": "tiny-gemma", "dataset": {"rows": quotes[:24]},
            "validation": {"dataset": {"rows": quotes[24:64]}},
            "hyperparameters": {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 1,
                                "max_length": 64, "eval_interval": 3, "seed": SEED}}


def _first(texts: list[str], pattern: str) -> int:
    return next((i for i, t in enumerate(texts) if re.search(pattern, t)), -1)


def test_job_page_shows_phases_then_reads_well(page: Page, service: str,  # noqa: F811
                                               quotes: list[dict[str, Any]], tmp_path: Path) -> None:
    page.add_init_script(RECORD_PROGRESS)
    page.goto("/")
    expect(page.get_by_test_id("jobs-table")).to_be_visible()
    resp = httpx.post(f"{service}/jobs", json=_job(quotes), timeout=60)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    page.goto(f"/#/jobs/{job_id}")
    expect(page.get_by_test_id("status")).to_have_text("succeeded", timeout=300_000)
    seen: list[str] = page.evaluate("window.__progress")

    # the phases, live: the evaluation before training, then training steps, never "step 0 / 6" meanwhile
    evaluating = _first(seen, r"^Evaluating before training( \(\d+/\d+\))?")
    training = _first(seen, r"^Training step [1-6] / 6")
    assert evaluating >= 0, f"the page never said it was evaluating before training: {seen}"
    assert training > evaluating, f"no training step shown after the evaluation: {seen}"
    assert not [t for t in seen[evaluating:training] if t.startswith("step ")], seen
    assert _first(seen, r"^Sampling (before|after) training") >= 0, seen
    assert _first(seen, r"^Saving the adapter") > training, seen
    # while a phase is known the ETA is a duration or "estimating…", never a bare or negative number;
    # at the start there is no measured rate yet
    phased = [t for t in seen if re.match(r"^(Queued|Preparing|Loading|Evaluating|Sampling|Training|Saving)", t)]
    assert all(ETA.search(t) for t in phased), phased
    assert "ETA estimating…" in phased[0], f"an ETA before any rate was measured: {phased}"
    # the job as done: the plain step count
    expect(page.get_by_test_id("progress-text")).to_contain_text("step 6 / 6")
    page.screenshot(path=str(tmp_path / "job-done.png"), full_page=True)

    # activity: one readable line per event, numbers to 4 significant digits, no raw JSON of a step
    lines = page.get_by_test_id("event-line").all_inner_texts()
    assert lines, "no activity lines"
    assert any(re.match(r"^step \d+ / 6 · loss \d", t) for t in lines), lines
    for t in lines:
        for number in re.findall(r"\d+\.\d+(?:e-?\d+)?", t):
            digits = re.sub(r"e-?\d+$", "", number).replace(".", "").lstrip("0")
            assert len(digits) <= 4, f"{number!r} in {t!r} has more than 4 significant digits"
        assert '{"step"' not in t and '"loss":' not in t, t

    # the request table keeps the template's newline; the seed has no thousands separators
    template = page.get_by_test_id("setup").locator("tr", has=page.locator("th", has_text="template")).locator("td")
    assert template.inner_text() == DEFAULT_TEMPLATE
    seed = page.get_by_test_id("hyperparameters").locator("tr", has=page.locator("th", has_text="seed")).locator("td")
    assert seed.inner_text() == str(SEED)

    # the loss chart's y ticks: evenly spaced round values, a step of 1, 2 or 5 x 10^k
    ticks = [float(t) for t in page.get_by_test_id("loss-chart").locator("text.ytick").all_text_contents()]
    assert len(ticks) >= 3, ticks
    steps = [round(b - a, 12) for a, b in itertools.pairwise(ticks)]
    assert all(math.isclose(s, steps[0], rel_tol=1e-9) for s in steps), ticks
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 5)), ticks
    assert all(math.isclose(t / steps[0], round(t / steps[0]), abs_tol=1e-6) for t in ticks), ticks
    losses = [p["loss"] for p in httpx.get(f"{service}/jobs/{job_id}/metrics").json()["data"] if p.get("loss")]
    assert losses and ticks[0] <= min(losses) and ticks[-1] >= max(losses), (ticks, losses)


def test_eta_and_old_records(page: Page) -> None:  # noqa: F811
    """The page's own rules, in the browser: no phase (a record from before phases) means the plain
    step count; no measured rate means "estimating…"."""
    page.goto("/")
    expect(page.get_by_test_id("jobs-table")).to_be_visible()
    got = page.evaluate("""() => [
      window.Fmt.phaseText({ step: 0, total_steps: 12, fraction: 0, eta_seconds: null }),
      window.Fmt.phaseText({ phase: "evaluating_before", phase_progress: { done: 3, total: 8 }, step: 0,
        total_steps: 12 }),
      window.Fmt.phaseText({ phase: "training", phase_progress: null, step: 4, total_steps: 12 }),
      window.Fmt.phaseText({ phase: "sampling_after", phase_progress: null, step: 12, total_steps: 12 }),
      window.Fmt.phaseText({ phase: "saving", phase_progress: null, step: 12, total_steps: 12 }),
      window.Fmt.eta(null), window.Fmt.eta(75), window.Fmt.eta(200),
      window.Fmt.sig(1614806677), window.Fmt.sig(0.00019999999999999998), window.Fmt.sig(2.34567891234)]""")
    assert got == [None, "Evaluating before training (3/8)", "Training step 4 / 12", "Sampling after training",
                   "Saving the adapter", "estimating…", "75 s", "3 min 20 s", "1614806677", "0.0002", "2.346"]
