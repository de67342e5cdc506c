"""Errors the Raft core raises to its caller (all under pykv.errors.Error)."""

from __future__ import annotations

from pykv.errors import Error, Unavailable


class NotLeader(Unavailable):
    """This node cannot take the request because it is not the leader (or is handing off).

    ``leader_hint`` is the node id this node believes leads the group, or None.
    """

    def __init__(self, leader_hint: int | None, reason: str = "not the leader") -> None:
        super().__init__(f"{reason}; leader hint: {leader_hint}")
        self.leader_hint = leader_hint


class ConfChangeRejected(Error):
    """A membership change was refused (one is pending, or it is not a single valid change)."""


class RaftUsageError(Error, RuntimeError):
    """The driver broke the Ready contract (e.g. asked for a Ready before advancing the last)."""


class RaftInvariantError(Error, AssertionError):
    """A safety invariant of Raft would be broken; the node refuses to go on (a bug)."""
