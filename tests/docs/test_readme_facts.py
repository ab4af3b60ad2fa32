"""The README's and the docs' facts about the example files, checked against the files themselves."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.core.jobs import JobCreate
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
EXAMPLES = ROOT / "examples"


def _jsonl_rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def test_the_walk_through_job_is_what_the_readme_says() -> None:
    body = JobCreate.model_validate(json.loads((EXAMPLES / "job.json").read_text()))  # the API's own schema
    said = re.search(r"# 1\. Train: (\d+) steps on (\d+) quotes \(examples/job\.json holds them inline; "
                     r"examples/quotes\.jsonl has (\d+) to upload\)", README)
    assert said, "the walk-through's first line changed: update this test with it"
    steps, inline, in_file = map(int, said.groups())
    assert body.hyperparameters.max_steps == steps
    assert body.dataset.rows is not None and len(body.dataset.rows) == inline
    assert _jsonl_rows(EXAMPLES / "quotes.jsonl") == in_file


def test_the_upload_example_answers_the_row_count_it_shows() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    said = re.search(r"-F file=@examples/quotes\.jsonl .*\"row_count\": (\d+)", api)
    assert said, "docs/api.md no longer shows the upload example's answer"
    assert int(said.group(1)) == _jsonl_rows(EXAMPLES / "quotes.jsonl")


def test_the_readme_links_only_to_files_that_exist() -> None:
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / target).exists(), target
