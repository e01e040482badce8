"""The Embedder's continuous batching (`serve.batching.ContinuousBatcher`): no wait on an idle network, the
requests that arrive during a pass share the next one, and a failing pass fails only its own requests."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mfr_ray.serve.batching import ContinuousBatcher


class Recorder:
    """A forward pass that records its batches and can be held until released."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail_on = fail_on

    def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(5)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [item.upper() for item in items]


def test_an_idle_network_runs_a_request_at_once():
    """The pass starts within a few event-loop steps, before any timer could fire: the loop is blocked
    while the test waits for it, so a batcher that sleeps for company first would never start it."""
    recorder = Recorder()
    batcher = ContinuousBatcher(recorder, max_batch_size=8)

    async def one() -> tuple[str, bool]:
        task = asyncio.create_task(batcher.submit("a"))
        for _ in range(3):
            await asyncio.sleep(0)
        started = recorder.started.wait(2)  # blocks the event loop: only a pass already in its thread runs
        return await task, started

    assert asyncio.run(one()) == ("A", True)
    assert recorder.batches == [["a"]]


def test_requests_arriving_during_a_pass_share_the_next_and_keep_their_order():
    recorder = Recorder()
    recorder.release.clear()  # the first pass is held until the others have arrived
    batcher = ContinuousBatcher(recorder, max_batch_size=4)

    async def scenario() -> list[str]:
        first = asyncio.create_task(batcher.submit("a"))
        while not recorder.batches:  # the first pass has started, alone
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(batcher.submit(x)) for x in "bcdefg"]
        await asyncio.sleep(0.01)
        recorder.release.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(scenario()) == list("ABCDEFG")
    assert recorder.batches == [["a"], ["b", "c", "d", "e"], ["f", "g"]]


def test_a_failing_pass_fails_its_own_requests_only():
    recorder = Recorder(fail_on="b")
    recorder.release.clear()
    batcher = ContinuousBatcher(recorder, max_batch_size=2)

    async def scenario():
        first = asyncio.create_task(batcher.submit("a"))
        while not recorder.batches:
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(batcher.submit(x)) for x in "bcd"]
        await asyncio.sleep(0.01)
        recorder.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    a, b, c, d = asyncio.run(scenario())
    assert a == "A" and d == "D"
    assert isinstance(b, ValueError) and isinstance(c, ValueError)  # b and c shared the failing pass
    assert recorder.batches == [["a"], ["b", "c"], ["d"]]


def test_a_wait_lets_an_idle_pass_gather_company():
    recorder = Recorder()
    batcher = ContinuousBatcher(recorder, max_batch_size=8, wait_s=0.05)

    async def scenario():
        first = asyncio.create_task(batcher.submit("a"))
        await asyncio.sleep(0.01)
        return await asyncio.gather(first, batcher.submit("b"))

    assert asyncio.run(scenario()) == ["A", "B"]
    assert recorder.batches == [["a", "b"]]


@pytest.mark.parametrize("answers", [[], ["X", "Y", "Z"]])
def test_a_pass_with_the_wrong_number_of_answers_is_an_error_not_a_hang(answers):
    batcher = ContinuousBatcher(lambda items: answers, max_batch_size=8)

    async def scenario():
        return await asyncio.wait_for(asyncio.gather(batcher.submit("a"), batcher.submit("b"),
                                                     return_exceptions=True), 5)

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "got" in str(r) for r in results)
