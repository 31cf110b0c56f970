"""Public data types of the library API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Stream = Literal["stdout", "stderr", "exit"]


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A piece of a command's output. The last chunk of a run has stream "exit"."""

    stream: Stream
    data: bytes = b""
    exit_code: int = 0
