"""Does the train worker's parent-process preload touch CUDA? (worker/tasks.py ``_preload``; GPU machine.)

The parent loads the default model's tokenizer as ``_preload`` does, then forks a child the way Celery's prefork
pool does; the child must be able to initialise CUDA and run a matmul ("Cannot re-initialize CUDA in forked
subprocess" otherwise).

Usage: python bench/fork_check.py MODEL_DIR   (a model folder train_bench.py built, e.g. its --model-cache)
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
HUB_ID = "google/gemma-2b"  # as gpu_smoke.HUB_ID; gpu_smoke itself imports the trainer, which this must not


def child(q: mp.Queue[str]) -> None:
    import torch

    try:
        x = torch.ones((64, 64), device="cuda")
        q.put(f"child: CUDA ok, {float((x @ x).sum()):.0f}")
    except Exception as e:  # the failure this checks for
        q.put(f"child: CUDA FAILED: {type(e).__name__}: {e}")


def main() -> int:
    import torch

    import worker.models
    from app.core.settings import Settings
    from worker.models import load_tokenizer

    worker.models._source = lambda name, settings: (sys.argv[1], {})  # no hub here: the local folder
    tok = load_tokenizer(HUB_ID, Settings(device="cuda"))
    print(f"parent: tokenizer {type(tok).__name__} ({len(tok)} entries) loaded; "
          f"CUDA initialised in the parent: {torch.cuda.is_initialized()}; "
          f"bitsandbytes imported: {'bitsandbytes' in sys.modules}")
    q: mp.Queue[str] = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=child, args=(q,))
    p.start()
    p.join(120)
    out = q.get(timeout=5)
    print(out)
    return 0 if "ok" in out and not torch.cuda.is_initialized() else 1


if __name__ == "__main__":
    sys.exit(main())
