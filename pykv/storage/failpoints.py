"""Named crash points for storage: a test arms one with PYKV_FAILPOINT and the process dies there.

``PYKV_FAILPOINT=storage.compact.after_copy`` (a comma-separated list is allowed) makes the
first pass through ``failpoint("storage.compact.after_copy")`` call ``os._exit(137)`` — the exit
status of a SIGKILL, with no cleanup, no flush and no atexit handlers, like a power cut for
everything that was not fsync'd. The names in use are listed in POINTS.
"""

from __future__ import annotations

import os

POINTS = frozenset(
    {
        # checkpoint (hint file): temp written + fsync'd, not renamed / renamed, dir not fsync'd
        "storage.checkpoint.before_rename",
        "storage.checkpoint.after_rename",
        # compaction: first relocation record appended (not durable), all copies durable,
        # new hint written but old segments not deleted yet, segments deleted
        "storage.compact.mid_copy",
        "storage.compact.after_copy",
        "storage.compact.after_checkpoint",
        "storage.compact.after_truncate",
    }
)

_ARMED = frozenset(name.strip() for name in os.environ.get("PYKV_FAILPOINT", "").split(",") if name.strip())


def failpoint(name: str) -> None:
    """Die here (exit status 137, no cleanup) when the test environment armed this name."""
    assert name in POINTS, f"unknown failpoint {name}"
    if name in _ARMED:
        os._exit(137)
