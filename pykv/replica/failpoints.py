"""Named crash points of the replica driver and the 2PC client; armed by PYKV_FAILPOINT.

``PYKV_FAILPOINT=replica.after_persist`` (a comma-separated list is allowed) makes the first
pass through ``failpoint("replica.after_persist")`` end the process with ``os._exit(137)``
(the status of a SIGKILL: no cleanup, no flush), as a crash at that point would.
"""

from __future__ import annotations

import os

POINTS = frozenset(
    {
        # between making a Ready batch durable and sending its messages (DESIGN §7)
        "replica.after_persist",
        # a node dies after applying a snapshot it received, before advancing
        "replica.after_snapshot_install",
        # the client coordinating a multi-shard commit dies after every participant
        # prepared and before the decision record is written / after it is written
        "txn.2pc.after_prepare",
        "txn.2pc.after_decide",
    }
)

_ARMED = frozenset(
    name.strip() for name in os.environ.get("PYKV_FAILPOINT", "").split(",") if name.strip()
)


def failpoint(name: str) -> None:
    """Die here (exit status 137, no cleanup) when the environment armed this name."""
    assert name in POINTS, f"unknown failpoint {name}"
    if name in _ARMED:
        os._exit(137)
