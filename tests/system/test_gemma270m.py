"""The real pretrained Gemma 3 270M, NF4 + LoRA through the whole service: loss falls, output changes."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import wait_for


def test_nf4_job_learns_and_changes_greedy_continuation(client: httpx.Client, quotes: list[dict[str, Any]]) -> None:
    rows = quotes[:48]
    body = {
        "base_model": "gemma-3-270m",
        "dataset": {"rows": rows},
        "validation": {"dataset": {"rows": quotes[48:60]}},
        "hyperparameters": {"max_steps": 10, "learning_rate": 1e-3, "warmup_steps": 1, "batch_size": 1,
                            "gradient_accumulation_steps": 4, "max_length": 96, "seed": 3,
                            "gradient_checkpointing": False, "quantization": "nf4"},
    }
    resp = client.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]

    losses: dict[int, float] = {}

    def record(job: dict[str, Any]) -> bool:
        if job["metrics"].get("loss") is not None:
            losses[job["progress"]["step"]] = job["metrics"]["loss"]
        return False

    # The job took 416 s alone on this 2-core machine on 2026-12-01 (32 s a step, 9 s an evaluation; the same on the
    # code before the layout change) and longer while other work shared the cores: the bound leaves room for that.
    done = wait_for(client, job_id, timeout=1800, check=record)
    assert done["status"] == "succeeded", done["error"]
    losses[done["progress"]["step"]] = done["metrics"]["loss"]
    steps = sorted(losses)
    assert len(steps) >= 3, f"progress was not reported while running: {losses}"
    first, last = losses[steps[0]], losses[steps[-1]]
    assert last < first, f"loss did not fall: {losses}"

    # evaluation: held-out loss before and after, before/after samples, stats, the metric series
    ev = done["evaluation"]
    assert ev["eval_loss_after"] < ev["eval_loss_before"], ev
    assert ev["relative_change"] == round((ev["eval_loss_after"] - ev["eval_loss_before"]) / ev["eval_loss_before"], 4)
    assert len(ev["samples"]) == 3 and all(s["before"] != s["after"] for s in ev["samples"])
    assert all(s["prompt"].startswith("Quote: ") for s in ev["samples"])
    stats = done["dataset_stats"]
    assert stats["validation_rows"] == 12 and stats["train_rows"] == 48 and stats["tokens"]["max"] > 5
    series = client.get(f"/jobs/{job_id}/metrics").json()["data"]
    assert [p["step"] for p in series if p.get("loss") is not None] == list(range(1, 11))
    evals = [p for p in series if p.get("eval_loss") is not None]
    assert len(evals) >= 3 and evals[0]["step"] == 0 and evals[-1]["eval_loss"] == ev["eval_loss_after"]
    assert all(p["tokens_seen"] > 0 for p in series if p.get("loss") is not None)

    prompt = f"Quote: {rows[0]['quote']}\n"  # a training example's quote: the author line should follow
    gen = {"prompt": prompt, "max_new_tokens": 24}
    base = client.post("/generate", json=gen | {"base_model": "gemma-3-270m"})
    tuned = client.post("/generate", json=gen | {"adapter": job_id})
    base_again = client.post("/generate", json=gen | {"base_model": "gemma-3-270m"})
    assert base.status_code == tuned.status_code == base_again.status_code == 200, (base.text, tuned.text)
    base_text, tuned_text = base.json()["outputs"][0]["text"], tuned.json()["outputs"][0]["text"]
    assert base_text != tuned_text
    # loading an adapter leaves the base model's own (greedy) output unchanged
    assert base_again.json()["outputs"][0]["text"] == base_text
    # the notebook's shape: the tuned model answers in the "Quote: ...\nAuthor: ..." format
    assert "Author:" in tuned_text, tuned_text
