"""Continuous request batching for the Embedder: a request that finds the network idle runs at once; requests
that arrive while a forward pass runs share the next one. Serve's `@serve.batch` waits a fixed time for
company even when nobody else is coming (its 10 ms were a sixth of an idle /identify), and with no wait it
forms one-image batches that queue behind each other, so it cannot give both."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class ContinuousBatcher:
    """`await submit(item)` -> `run_batch([..., item, ...])`'s answer for it. Passes run one at a time in a
    worker thread (off the event loop, so the next batch gathers meanwhile), each on at most
    `max_batch_size` items in arrival order; `wait_s` > 0 makes a pass that starts on an idle network wait
    that long for company first. A pass that raises fails its own requests only."""

    def __init__(self, run_batch: Callable[[list], list], max_batch_size: int, wait_s: float = 0.0):
        self._run_batch, self.max_batch_size, self.wait_s = run_batch, max_batch_size, wait_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Run passes until nothing is pending (the check and the return share one event-loop step, so a
        request submitted later always finds either this worker busy or no worker)."""
        if self.wait_s > 0:
            await asyncio.sleep(self.wait_s)
        while self._pending:
            batch = self._pending[: self.max_batch_size]
            del self._pending[: self.max_batch_size]
            try:
                results = await asyncio.to_thread(self._run_batch, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} got {len(results)} answers")
            except Exception as exc:  # noqa: BLE001 - the pass's own requests get it, the next pass runs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # a caller that went away cancelled its future
                    future.set_result(result)
