"""Running a piece of a test in a child made by os.fork(), with a deadline."""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable


def in_forked_child(body: Callable[[], object], timeout: float = 10.0) -> str:
    """Run ``body`` in a child made by os.fork(): what it returned or raised, as text, or
    "hung" if it said nothing within ``timeout`` seconds (the child is then killed)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        try:
            try:
                outcome = f"returned {body()!r}"
            except BaseException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        if not select.select([read_end], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            return "hung"
        return os.read(read_end, 4096).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
