"""pykv: a distributed, transactional key-value store with a Cython core."""

from pykv.errors import (
    CorruptData,
    Error,
    InvalidKey,
    InvalidOperation,
    InvalidValue,
    KeyTooLarge,
    NonResolvableConflict,
    ProtocolError,
    StoreClosed,
    StoreLocked,
    Timeout,
    TransactionAborted,
    TransactionConflict,
    TransactionTooLarge,
    Unavailable,
    ValueTooLarge,
)

__version__ = "0.1.0"

__all__ = [
    "CorruptData",
    "Error",
    "InvalidKey",
    "InvalidOperation",
    "InvalidValue",
    "KeyTooLarge",
    "NonResolvableConflict",
    "ProtocolError",
    "StoreClosed",
    "StoreLocked",
    "Timeout",
    "TransactionAborted",
    "TransactionConflict",
    "TransactionTooLarge",
    "Unavailable",
    "ValueTooLarge",
]
