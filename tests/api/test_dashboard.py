"""The web dashboard at ``/`` in a real browser: Debian's chromium driven headless by Playwright.

Creates a job from the form (uploading a JSONL file), follows it to ``succeeded`` on its page, checks
the loss chart has drawn points, then compares the base model and the adapter in the playground.
A screenshot of each page is saved under the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() == "true"

if not IN_CI and not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (CI installs it: .ci/run)", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        context = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield context
        context.close()


@pytest.fixture
def page(browser: Browser, service: str) -> Iterator[Page]:
    context = browser.new_context(base_url=service, viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_static_files_and_unknown_names(service: str) -> None:
    index = httpx.get(f"{service}/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in index.text
    js = httpx.get(f"{service}/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    missing = httpx.get(f"{service}/static/..%2Fmain.py")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_dashboard_end_to_end(page: Page, service: str, quotes: list[dict[str, Any]], tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    data = tmp_path / "dashboard-quotes.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in quotes[:8]))

    # jobs table
    page.goto("/")
    expect(page.get_by_test_id("jobs-table")).to_be_visible()
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)

    # an API error is shown readably: a job on no dataset
    page.goto("/#/new")
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("error").first).to_contain_text("Choose a file")

    # new-job form: upload the file, tiny-gemma, 3 steps, tiny hyperparameters
    page.get_by_test_id("file").set_input_files(str(data))
    page.get_by_test_id("base-model").fill("tiny-gemma")
    page.get_by_test_id("max-steps").fill("3")
    page.locator("details summary").click()
    page.get_by_test_id("hp-batch_size").fill("2")
    page.get_by_test_id("hp-gradient_accumulation_steps").fill("1")
    page.get_by_test_id("hp-max_length").fill("64")
    page.get_by_test_id("hp-gradient_checkpointing").uncheck()
    page.get_by_test_id("advanced-json").fill('{"seed": 7}')
    page.screenshot(path=str(shots / "new-job.png"), full_page=True)
    page.get_by_test_id("submit").click()

    # the job page: follows the job live to succeeded, with the chart drawn
    page.wait_for_url(re.compile(r"#/jobs/job_[0-9a-f]{22}$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.get_by_test_id("status")).to_have_text("succeeded", timeout=300_000)
    expect(page.get_by_test_id("progress-text")).to_contain_text("step 3 / 3")
    chart = page.get_by_test_id("loss-chart")
    expect(chart.locator("circle.train")).to_have_count(3)
    assert chart.locator("circle").count() > 0 and chart.locator("path.line").count() > 0
    expect(page.get_by_test_id("hyperparameters")).to_contain_text("max_length")
    expect(page.get_by_test_id("dataset-stats")).to_contain_text("rows_used")
    expect(page.get_by_test_id("cancel")).to_have_count(0)
    page.screenshot(path=str(shots / "job.png"), full_page=True)

    # the same job as the API has it
    job = httpx.get(f"{service}/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["request"]["hyperparameters"]["batch_size"] == 2
    assert job["request"]["dataset"]["id"].startswith("ds_")

    # the jobs table lists it
    page.goto("/")
    expect(page.locator(f'tr[data-job="{job_id}"]')).to_contain_text("succeeded")

    # playground: base model and adapter side by side
    page.goto("/#/playground")
    page.get_by_test_id("adapter").select_option(job_id)
    page.get_by_test_id("prompt").fill("Quote: Imagination is")
    page.get_by_test_id("max-new-tokens").fill("8")
    page.get_by_test_id("generate").click()
    for key in ("base", "adapter"):
        pane = page.get_by_test_id(f"{key}-output")
        expect(pane).to_have_attribute("data-done", "true", timeout=180_000)
        assert pane.inner_text().strip(), f"the {key} pane is empty"
        expect(page.get_by_test_id(f"{key}-meta")).to_contain_text("tokens")
    expect(page.get_by_test_id("adapter-meta")).to_contain_text(job_id)
    page.screenshot(path=str(shots / "playground.png"), full_page=True)
    assert all((shots / f"{n}.png").stat().st_size > 0 for n in ("jobs", "new-job", "job", "playground"))


def test_dashboard_shows_api_errors(page: Page) -> None:
    page.goto("/#/jobs/job_0000000000000000000000")
    expect(page.get_by_test_id("error").first).to_contain_text("no job with id")
    expect(page.get_by_test_id("error").first).to_contain_text("job_not_found")
    page.goto("/#/playground?adapter=job_0000000000000000000000")
    expect(page.get_by_test_id("error").first).to_contain_text("not a succeeded job")
