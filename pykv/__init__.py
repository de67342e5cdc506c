"""pykv: a distributed, transactional key-value store with a Cython core."""

import importlib

from pykv.errors import (
    CorruptData,
    Error,
    InvalidArgument,
    InvalidKey,
    InvalidOperation,
    InvalidValue,
    KeyTooLarge,
    NonResolvableConflict,
    NotAnswering,
    OutcomeUnknown,
    ProtocolError,
    ReadOnlyStore,
    ScanTooLarge,
    StoreClosed,
    StoreLocked,
    Timeout,
    TransactionAborted,
    TransactionConflict,
    TransactionTooLarge,
    Unavailable,
    ValueTooLarge,
    WrongCluster,
)

__version__ = "0.1.0"

# The store classes load lazily (PEP 562): ``import pykv`` stays cheap and does not need the
# storage engine until a store is used, so layers below it import pykv without cycles.
_LAZY = {
    "open": ("pykv.embedded", "open"),
    "connect": ("pykv.client", "connect"),
    "KeyValueStore": ("pykv.api", "KeyValueStore"),
    "Transaction": ("pykv.api", "Transaction"),
    "VClock": ("pykv._engine.vclock", "VClock"),
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'pykv' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

__all__ = [
    "CorruptData",
    "Error",
    "InvalidArgument",
    "InvalidKey",
    "InvalidOperation",
    "InvalidValue",
    "KeyTooLarge",
    "KeyValueStore",
    "NonResolvableConflict",
    "NotAnswering",
    "OutcomeUnknown",
    "ProtocolError",
    "ReadOnlyStore",
    "ScanTooLarge",
    "StoreClosed",
    "StoreLocked",
    "Timeout",
    "Transaction",
    "TransactionAborted",
    "TransactionConflict",
    "TransactionTooLarge",
    "Unavailable",
    "VClock",
    "ValueTooLarge",
    "WrongCluster",
    "connect",
    "open",
]
