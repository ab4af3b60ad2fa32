"""The adapter slots of one base model's engine (worker.serve.engine): which adapter sits in which slot of
worker.serve.multi_lora, least recently used first, how many running rows use each, and a loader thread that
reads adapters from disk, so that a cold adapter delays only the requests that need it (as LoRAX's loader).

Only the engine thread calls into it; the loader thread only reads files.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from app.core.errors import UserFacingError
from app.core.ids import JOB_ID
from worker.serve.multi_lora import AdapterWeights, MultiLoraLinear, read_adapter, write_slot

log = logging.getLogger("ftaas.batcher")

#: The slot of a row that runs the base model alone (no adapter: its LoRA mask is all zeros).
BASE_MODEL = -1


class AdapterSlots:
    def __init__(self, wrapped: dict[str, MultiLoraLinear], slots: int, rank: int,
                 adapter_path: Callable[[str], Path]) -> None:
        self.wrapped, self.rank, self.adapter_path = wrapped, rank, adapter_path
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recently used first
        self.free_slots = list(range(slots))
        self.slot_users = [0] * slots  # running rows per slot
        self.loading: dict[str, Future[AdapterWeights]] = {}  # adapters being read, by name
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")

    @property
    def size(self) -> int:
        """How many adapters fit at once."""
        return len(self.slot_users)

    def loaded(self) -> list[str]:
        """The adapters in slots, least recently used first."""
        return list(self.slot_of)

    def holds(self, name: str) -> bool:
        """Whether adapter ``name`` sits in a slot now (``slot_for`` then answers at once: a cache hit)."""
        return name in self.slot_of

    def slot_for(self, name: str) -> int | None:
        """The slot holding adapter ``name`` (now the most recently used), or None while it is read from disk
        (the read is started on the first call) or while no slot is free of running rows.

        Raises UserFacingError for a name that is no job id and for an adapter that is missing or cannot be
        served."""
        if not JOB_ID.fullmatch(name):  # checked before it becomes a path
            raise UserFacingError("adapter_not_found", f"no adapter {name!r}")
        if name in self.slot_of:
            self.slot_of.move_to_end(name)
            return self.slot_of[name]
        fut = self.loading.get(name)
        if fut is None:
            self.loading[name] = self.loader.submit(self._read, name, time.monotonic())
            return None
        if not fut.done():
            return None
        if fut.exception() is not None:
            del self.loading[name]
            fut.result()  # raises UserFacingError for a missing or unsupported adapter
        if not self.free_slots:
            idle = [a for a, s in self.slot_of.items() if self.slot_users[s] == 0]
            if not idle:
                return None
            self.free_slots.append(self.slot_of.pop(idle[0]))
            log.info("evicting adapter %s", idle[0])
        weights = self.loading.pop(name).result()
        slot = self.free_slots.pop()
        write_slot(self.wrapped, slot, weights)
        self.slot_of[name] = slot
        return slot

    def use(self, slot: int) -> None:
        """One more running row uses ``slot`` (it is not evicted while any does)."""
        self.slot_users[slot] += 1

    def release(self, slot: int) -> None:
        """A row that used ``slot`` finished or failed."""
        self.slot_users[slot] -= 1

    def close(self) -> None:
        self.loader.shutdown(wait=False)

    def _read(self, name: str, t: float) -> AdapterWeights:
        weights = read_adapter(self.adapter_path(name), name, self.rank, set(self.wrapped))
        log.info("read adapter %s (%.1f MB) in %.0f ms", name, weights.nbytes / 1e6, (time.monotonic() - t) * 1e3)
        return weights
