"""The process plumbing's background tasks: kept until they end, a failure logged, the rest cancelled on stop."""

from __future__ import annotations

import asyncio
import gc
import logging

from atelier.runtime import TaskSet


def test_a_task_set_keeps_its_tasks_logs_their_failures_and_cancels_the_rest(caplog):
    async def fail(message: str) -> None:
        raise ValueError(message)

    async def go() -> tuple[asyncio.Task, int]:
        tasks = TaskSet("owner")
        waiting = tasks.spawn(asyncio.Event().wait(), "wait")
        tasks.spawn(fail("nobody waits for this one"), "lost")
        answered = tasks.spawn(fail("its asker handles this one"), "answered", log_failure=False)
        gc.collect()  # the loop holds tasks weakly: only the set keeps them
        await asyncio.sleep(0.01)
        assert isinstance(answered.exception(), ValueError)
        left = len(tasks)
        await tasks.cancel_all()
        return waiting, left

    with caplog.at_level(logging.ERROR, logger="atelier.runtime"):
        waiting, left = asyncio.run(go())
    assert left == 1 and waiting.cancelled()
    assert "owner: task owner-lost failed" in caplog.text and "nobody waits for this one" in caplog.text
    assert "its asker handles this one" not in caplog.text
