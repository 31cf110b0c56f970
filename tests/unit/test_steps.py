"""The start-up step runner undoes exactly what ran."""

from __future__ import annotations

import asyncio

import pytest

from arcbox_vm.manager.steps import Step, StepRunner


async def test_failure_undoes_completed_steps_in_reverse():
    log: list[str] = []

    def mk(name, fail=False):
        async def run():
            if fail:
                raise RuntimeError(name)
            log.append(f"run {name}")

        async def undo():
            log.append(f"undo {name}")

        return Step(name, run, undo)

    runner = StepRunner([mk("a"), mk("b"), mk("c", fail=True), mk("d")])
    with pytest.raises(RuntimeError):
        await runner.run()
    assert log == ["run a", "run b", "undo b", "undo a"]


async def test_cancellation_also_undoes_and_steps_are_editable():
    log: list[str] = []

    async def slow():
        await asyncio.sleep(10)

    async def note():
        log.append("undo first")

    runner = StepRunner([Step("first", asyncio.sleep, None)])
    runner.replace("first", Step("first", lambda: asyncio.sleep(0), note))
    runner.insert_after("first", Step("slow", slow))
    assert runner.names() == ["first", "slow"]
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["undo first"]
    runner.remove("slow")
    assert runner.names() == ["first"]
