"""An ordered list of named start-up steps, each with its own undo.

Like firecracker-go-sdk's handler lists: a failure undoes exactly the steps that ran, in
reverse order, and callers can insert, replace or drop steps by name.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Action = Callable[[], Awaitable[None]]


@dataclass
class Step:
    name: str
    run: Action
    undo: Action | None = None


class StepRunner:
    """Runs steps in order; on failure (or cancellation) undoes the completed ones."""

    def __init__(self, steps: list[Step] | None = None) -> None:
        self.steps: list[Step] = list(steps or [])
        self._done: list[Step] = []

    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def _index(self, name: str) -> int:
        for i, s in enumerate(self.steps):
            if s.name == name:
                return i
        raise KeyError(f"no step named {name!r}; steps are {self.names()}")

    def insert_after(self, name: str, step: Step) -> None:
        self.steps.insert(self._index(name) + 1, step)

    def replace(self, name: str, step: Step) -> None:
        self.steps[self._index(name)] = step

    def remove(self, name: str) -> None:
        del self.steps[self._index(name)]

    async def run(self, on_step: Callable[[str], None] | None = None) -> None:
        try:
            for step in self.steps:
                if on_step:
                    on_step(step.name)
                await step.run()
                self._done.append(step)
        except BaseException:
            await self.undo()
            raise

    async def undo(self) -> None:
        """Undo every completed step, newest first; undo errors are logged, not raised."""
        while self._done:
            step = self._done.pop()
            if step.undo is None:
                continue
            try:
                await step.undo()
            except Exception:  # keep undoing the rest
                log.exception("undoing step %r failed", step.name)
