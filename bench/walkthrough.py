"""The README's walk-through job, timed: POST examples/job.json to a running service (``make run``), wait for it
to succeed, print the time of each phase (from the job's ``phase`` events) and POST to succeeded.

    make run &                                  # or ftaas serve; wait for "ready"
    python bench/walkthrough.py [--url http://127.0.0.1:8000] [--runs 3]

The figure the README states is the median of ``--runs`` runs on a quiet machine (nothing else using the cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

JOB = Path(__file__).resolve().parent.parent / "examples" / "job.json"


def run_once(client: httpx.Client, body: dict[str, Any], timeout_s: float) -> dict[str, float]:
    t0 = time.time()
    created = client.post("/jobs", json=body)
    created.raise_for_status()
    job_id = created.json()["id"]
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{job_id} still {job['status']} after {timeout_s:g} s")
        time.sleep(0.2)
    t_end = time.time()
    if job["status"] != "succeeded":
        raise SystemExit(f"{job_id} {job['status']}: {job.get('error')}")
    events = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    marks: list[tuple[str, float]] = [("queued", t0)]
    for ev in events:
        phase = ev["data"].get("phase") if ev["type"] == "phase" else None
        if phase and phase != marks[-1][0]:
            marks.append((phase, ev["time"]))
    marks.append(("end", job["finished_at"]))
    times = {name: round(t_next - t, 2) for (name, t), (_, t_next) in itertools.pairwise(marks)}
    times["POST to succeeded"] = round(t_end - t0, 2)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    body = json.loads(JOB.read_text())
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=60) as client:
        runs = [run_once(client, body, args.timeout) for _ in range(args.runs)]
    names = list(dict.fromkeys(k for r in runs for k in r))
    print(f"{'phase':<20}" + "".join(f"{'run ' + str(i + 1):>9}" for i in range(len(runs))) + f"{'median':>9}")
    for name in names:
        values = [r.get(name, 0.0) for r in runs]
        print(f"{name:<20}" + "".join(f"{v:>9.2f}" for v in values) + f"{statistics.median(values):>9.2f}")


if __name__ == "__main__":
    main()
