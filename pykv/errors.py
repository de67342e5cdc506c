"""The exception hierarchy every layer raises; a leaf module that imports nothing of pykv."""


class Error(Exception):
    """Base class of every error pykv raises on purpose."""


# --- limits (DESIGN §1): raised before anything is written -------------------------------


class LimitError(Error, ValueError):
    """A key, value or transaction breaks one of the store's limits."""


class KeyTooLarge(LimitError):
    """A key is empty or longer than 256 bytes as UTF-8."""


class ValueTooLarge(LimitError):
    """A value encodes to more than the maximum value size (1 MiB by default)."""


class TransactionTooLarge(LimitError):
    """A transaction holds more operations than ``max_txn_ops``, or writes more bytes than
    ``max_txn_bytes`` (32 MiB by default)."""


class ScanTooLarge(LimitError):
    """A scan that returns its whole range at once (the asyncio client's ``scan()``, a list)
    would hold more than ``max_scan_bytes`` (256 MiB by default); ``scan_iter`` streams any
    range, as the synchronous ``scan`` does."""


class InvalidArgument(Error, ValueError):
    """A configuration value, address, or other argument that is not a key or value is bad."""


class InvalidKey(LimitError, TypeError):
    """A key is not a ``str``."""


class InvalidValue(LimitError, TypeError):
    """A value is not a str, a signed 64-bit int, bytes, or a list of those scalars."""


# --- transactions (DESIGN §3) ------------------------------------------------------------


class TransactionConflict(Error):
    """Validation failed because of a concurrent transaction; retrying may succeed."""


class NonResolvableConflict(TransactionConflict):
    """A write-write conflict that the key's resolver refused to merge."""


class KeyLocked(TransactionConflict):
    """A key the commit needs is locked by a prepared transaction that has not finished
    yet (a cluster's two-phase commit). The client sends the same commit again a few times
    over some milliseconds before it raises this."""


class TransactionAborted(Error):
    """The transaction id is unknown, already committed, or already aborted."""


class InvalidOperation(Error):
    """An operation that cannot apply to the stored value (e.g. incr on a str)."""


# --- availability --------------------------------------------------------------------------


class Unavailable(Error):
    """No quorum (or no reachable node) for the shard that owns a key."""


class NotAnswering(Unavailable):
    """A node took the connection but did not greet within the timeout: it is paused
    (SIGSTOP), overloaded or cut off mid-way, not down (a down node refuses the connection)."""


class Timeout(Error):
    """An operation did not finish within its deadline; its outcome may be unknown."""


class OutcomeUnknown(Timeout):
    """A retried commit reached a shard that no longer remembers the transaction (it keeps
    the outcomes of its most recent ones): it may have committed, or not. Never applied twice."""


class StoreClosed(Error):
    """The store was closed; open it again to continue."""


class StoreLocked(Error):
    """Another process holds the data directory open."""


class ReadOnlyStore(Error):
    """A write to a store opened with ``pykv.open(path, read_only=True)``: open it without
    ``read_only`` to write (nothing of the transaction was written)."""


class CorruptData(Error):
    """Durable state failed a checksum or format check outside a recoverable torn tail."""


class ProtocolError(Error):
    """A peer sent a malformed, oversized or unexpected frame."""


class WrongCluster(ProtocolError):
    """The node at an address belongs to another cluster than this node or client (a
    misconfigured address, or another cluster started on the same ports)."""


def by_name(name: str, message: str) -> Error:
    """The pykv error named ``name`` (an error that crossed the wire or a replicated log as
    [name, message]); a plain Error for a name this version does not know."""
    cls = globals().get(name)
    if not (isinstance(cls, type) and issubclass(cls, Error)):
        cls = Error
    return cls(message)
