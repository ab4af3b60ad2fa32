"""The web dashboard at ``/`` in a real browser: Debian's chromium driven headless by Playwright.

Creates a job from the form (uploading a JSONL file), follows it to ``succeeded`` on its page, checks
the loss chart has drawn points, then compares the base model and the adapter in the playground.
A screenshot of each page is saved under the test's tmp_path. The form's defaults are checked against
the API's schema, and its base-model hint against GET /v1/models. Phases and the job page's text:
test_dashboard_phases.py (which borrows this module's browser fixtures).
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


def test_favicon(service: str) -> None:
    ico = httpx.get(f"{service}/favicon.ico")
    assert ico.status_code == 200 and ico.headers["content-type"] == "image/x-icon"
    assert ico.content[:4] == b"\x00\x00\x01\x00"  # an ICO file's header: reserved 0, type 1 (icon)
    index = httpx.get(f"{service}/").text
    link = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', index)
    assert link, "index.html links no SVG icon"
    svg = httpx.get(f"{service}{link.group(1)}")
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml" and b"<svg" in svg.content


def _schema_defaults(service: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """JobCreate's and Hyperparameters' defaults as the API's OpenAPI schema has them (None where none)."""
    spec = httpx.get(f"{service}/openapi.json", timeout=60)
    assert spec.status_code == 200 and "components" in spec.json(), spec.text[:500]
    schemas = spec.json()["components"]["schemas"]
    job, hp = schemas["JobCreate"]["properties"], schemas["Hyperparameters"]["properties"]
    assert job["hyperparameters"] == {"$ref": "#/components/schemas/Hyperparameters"}
    return ({k: v.get("default") for k, v in job.items()}, {k: v.get("default") for k, v in hp.items()})


def test_new_job_form_starts_from_the_api_defaults(page: Page, service: str) -> None:
    job_defaults, hp_defaults = _schema_defaults(service)
    assert hp_defaults["gradient_checkpointing"] is False  # the default the form used to contradict
    page.goto("/#/new")
    expect(page.get_by_test_id("new-job-form")).to_have_attribute("data-defaults", "loaded")
    numbers = {"max_steps": "max-steps", "batch_size": "hp-batch_size",
               "gradient_accumulation_steps": "hp-gradient_accumulation_steps",
               "learning_rate": "hp-learning_rate", "max_length": "hp-max_length", "eval_interval": "hp-eval_interval"}
    for field, testid in numbers.items():
        shown = page.get_by_test_id(testid).input_value()
        want = hp_defaults[field]
        assert (float(shown) if shown else None) == want, f"{field}: the form shows {shown!r}, the API has {want!r}"
    assert page.get_by_test_id("hp-gradient_checkpointing").is_checked() is hp_defaults["gradient_checkpointing"]
    assert page.get_by_test_id("template").input_value() == job_defaults["template"]
    assert page.get_by_test_id("format").input_value() == job_defaults["format"]
    for field, testid in {"base_model": "base-model", "name": "name"}.items():
        assert job_defaults[field] is None and page.get_by_test_id(testid).input_value() == ""
    assert page.get_by_test_id("advanced-json").input_value() == ""


def test_untouched_form_makes_the_api_default_job(page: Page, service: str, quotes: list[dict[str, Any]],
                                                  tmp_path: Path) -> None:
    """A job from the form as it opens has the hyperparameters a request naming none gets from the API."""
    data = tmp_path / "defaults.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in quotes[:8]))
    page.goto("/#/new")
    expect(page.get_by_test_id("new-job-form")).to_have_attribute("data-defaults", "loaded")
    page.get_by_test_id("file").set_input_files(str(data))
    page.get_by_test_id("submit").click()
    page.wait_for_url(re.compile(r"#/jobs/job_[0-9a-f]{22}$"))
    form_id = page.url.rsplit("/", 1)[1]
    with httpx.Client(base_url=service, timeout=60) as api:
        form_job = api.get(f"/jobs/{form_id}").json()
        direct = api.post("/jobs", json={"dataset": form_job["request"]["dataset"]})
        assert direct.status_code == 202, direct.text
        api_job = direct.json()
        for job_id in (form_id, api_job["id"]):
            assert api.post(f"/jobs/{job_id}/cancel").status_code == 202
    got, want = form_job["request"], api_job["request"]
    for req in (got, want):
        req["hyperparameters"].pop("seed")  # chosen per job when absent
    assert got["hyperparameters"] == want["hyperparameters"]
    assert got["hyperparameters"]["gradient_checkpointing"] is False
    assert {k: got.get(k) for k in ("template", "format", "base_model")} == \
        {k: want.get(k) for k in ("template", "format", "base_model")}


def test_base_model_hint_lists_the_api_models(page: Page, service: str) -> None:
    models = httpx.get(f"{service}/v1/models").json()["data"]
    bases = [m["id"] for m in models if not m["id"].startswith("ft:")]
    assert "google/gemma-2b-it" in bases and "tiny-gemma" in bases  # configured ones, not a list in the page
    page.goto("/#/new")
    hint = page.get_by_test_id("base-model-hint")
    expect(hint).to_have_attribute("data-loaded", "true")
    assert hint.inner_text() == ", ".join(bases)
    options = page.locator("datalist#base-models option")
    assert [options.nth(i).get_attribute("value") for i in range(options.count())] == bases
    page.goto("/#/playground")
    pg = page.locator("datalist#pg-base-models option")
    expect(pg).to_have_count(len(bases))
    assert [pg.nth(i).get_attribute("value") for i in range(pg.count())] == bases


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
    expect(page.get_by_test_id("new-job-form")).to_have_attribute("data-defaults", "loaded")
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
