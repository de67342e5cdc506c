"""Raft as a pure state machine: step/tick/propose in, a Ready batch out; no I/O, no clock."""

from pykv.raft.errors import ConfChangeRejected, NotLeader, RaftInvariantError, RaftUsageError
from pykv.raft.messages import (
    CAMPAIGN_TRANSFER,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgType,
    PersistentState,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)
from pykv.raft.node import READ_LEASE, READ_SAFE, RaftConfig, RaftNode, bootstrap_state

__all__ = [
    "CAMPAIGN_TRANSFER", "ConfChange", "ConfChangeKind", "ConfChangeRejected", "ConfState",
    "ConsensusModule", "Entry", "EntryKind", "HardState", "Message", "MsgType", "NotLeader",
    "PersistentState", "READ_LEASE", "READ_SAFE", "RaftConfig", "RaftInvariantError", "RaftNode",
    "RaftUsageError", "ReadState", "Ready", "Role", "Snapshot", "SnapshotMeta", "SoftState",
    "bootstrap_state",
]


def __getattr__(name: str):
    # ConsensusModule runs threads and real timers; import it only when asked for, so the
    # pure core stays importable without pulling in threading.
    if name == "ConsensusModule":
        from pykv.raft.consensus import ConsensusModule

        return ConsensusModule
    raise AttributeError(name)
