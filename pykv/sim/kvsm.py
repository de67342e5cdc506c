"""The replicated map the simulator runs on Raft: registers with write and compare-and-set.

Commands are msgpack-encodable lists. Each carries the client's id and a per-client sequence
number; the state machine remembers each client's last sequence number and result, so a
command that arrives twice (a retry, or a duplicated message) takes effect once and both
copies get the same answer.
"""

from __future__ import annotations

from typing import Any

from pykv.codec import pack, unpack

WRITE = "w"
CAS = "cas"
PROBE = "probe"


def write_cmd(client: int, seq: int, key: str, value: Any) -> list:
    return [WRITE, client, seq, key, value]


def cas_cmd(client: int, seq: int, key: str, expected: Any, new: Any) -> list:
    return [CAS, client, seq, key, expected, new]


def probe_cmd(client: int, seq: int) -> list:
    return [PROBE, client, seq]


class KVStateMachine:
    """A map of registers plus the client session table that makes commands idempotent."""

    __slots__ = ("data", "sessions", "applied")

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.sessions: dict[int, tuple[int, Any]] = {}
        self.applied = 0

    def apply(self, index: int, cmd: Any) -> Any:
        """Apply the command of log entry ``index``; returns its result (None for no-ops)."""
        self.applied = index
        if not isinstance(cmd, list):
            return None  # a leader's empty entry or a configuration entry
        kind, client, seq = cmd[0], cmd[1], cmd[2]
        last = self.sessions.get(client)
        if last is not None and seq <= last[0]:
            return last[1] if seq == last[0] else None
        if kind == WRITE:
            self.data[cmd[3]] = cmd[4]
            result: Any = True
        elif kind == CAS:
            key, expected, new = cmd[3], cmd[4], cmd[5]
            result = self.data.get(key) == expected
            if result:
                self.data[key] = new
        else:
            result = True
        self.sessions[client] = (seq, result)
        return result

    def read(self, key: str) -> Any:
        return self.data.get(key)

    def snapshot(self) -> bytes:
        return pack([self.applied, self.data, [[c, s, r] for c, (s, r) in self.sessions.items()]])

    @classmethod
    def restore(cls, blob: bytes) -> KVStateMachine:
        applied, data, sessions = unpack(blob)
        sm = cls()
        sm.applied = applied
        sm.data = dict(data)
        sm.sessions = {c: (s, r) for c, s, r in sessions}
        return sm
