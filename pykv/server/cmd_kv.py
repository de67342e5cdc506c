"""`pykv get|put|txn|scan|resolvers`: read, write, run small transactions, list keys and
manage conflict resolvers from the shell.

    pykv get user:1 --addresses 127.0.0.1:7401
    pykv put user:1 alice --addresses 127.0.0.1:7401          (--type int|str|json)
    pykv txn --addresses 127.0.0.1:7401 get:a put:b=2 incr:c=5 append:log=x delete:d
    pykv scan user: --addresses 127.0.0.1:7401                (--start, --end, --limit, --plain)
    pykv resolvers --addresses 127.0.0.1:7401                 (--set PREFIX NAME, --unset PREFIX)

Each takes ``--data-dir DIR`` instead of ``--addresses`` to use an embedded store (one that
no process has open): ``get``, ``scan`` and a ``txn`` of only gets open it read-only, so
they change nothing and may run side by side.

Values print as JSON (strings too, so that "1" and 1 differ); bytes as base64 in
{"base64": ...}. ``get`` of an absent key prints nothing and exits 1. ``txn`` runs all its
operations in one transaction (reads see the transaction's own writes) and prints one
JSON object: the value each ``get`` saw, keyed by position and key. ``scan`` prints one JSON
object per key, ``{"key": ..., "value": ...}``, in key order: one snapshot of the range, or
with ``--plain`` one pass printed as the pages come (any size, no snapshot). ``resolvers``
prints the registered resolvers, ``{prefix: name}``, after registering or forgetting one.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

import pykv
from pykv.api import KeyValueStore
from pykv.client import connect
from pykv.errors import Error, InvalidValue
from pykv.server.cli import add_addresses_argument
from pykv.txn.resolvers import BUILTIN

_MISSING = object()


def _connect_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    add_addresses_argument(where, help="a cluster's nodes")
    where.add_argument("--data-dir", metavar="DIR", help="an embedded store's directory")
    parser.add_argument("--timeout", type=float, default=10.0)


def _store(args: argparse.Namespace, *, writes: bool) -> KeyValueStore:
    """The cluster at --addresses, or the embedded store in --data-dir (read-only unless
    the command ``writes``)."""
    if args.data_dir is not None:
        return pykv.open(args.data_dir, read_only=not writes)
    return connect(args.addresses, timeout=args.timeout)


def _is_address(item: str) -> bool:
    host, sep, port = item.rpartition(":")
    return bool(sep and host and port.isdigit())


def trailing_positional(addresses: list[str]) -> str | None:
    """The positional argument that ``--addresses A B ARG`` handed to --addresses, taken
    back from it; None when its last item reads as HOST:PORT or is the only one."""
    if len(addresses) > 1 and not _is_address(addresses[-1]):
        return addresses.pop()
    return None


def _reclaim(args: argparse.Namespace, names: tuple[str, ...], usage: str) -> str | None:
    """Take back the positionals that ``--addresses A B key`` hands to --addresses (it takes
    one or more values): the missing ones, from its end, in order. A missing one whose
    item reads as HOST:PORT is taken only when it is required (``names`` without a "?"
    suffix), and at least one address stays. Returns an error message, or None."""
    missing = [name for name in names if getattr(args, name.rstrip("?")) is None]
    if args.addresses is None:  # --data-dir: argparse gave every positional its place
        required = [name for name in missing if not name.endswith("?")]
        return f"needs {usage}" if required else None
    for name in reversed(missing):
        optional = name.endswith("?")
        if len(args.addresses) < 2 or (optional and _is_address(args.addresses[-1])):
            if optional:
                continue
            return f"needs {usage} and at least one --addresses HOST:PORT"
        setattr(args, name.rstrip("?"), args.addresses.pop())
    return None


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def parse_value(text: str, kind: str) -> Any:
    if kind == "str":
        return text
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise InvalidValue(f"{text!r} is not an int") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidValue(f"{text!r} is not JSON: {exc}") from None


def _fail(exc: Error) -> int:
    print(f"pykv: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 2


def _usage_error(command: str, problem: str) -> int:
    print(f"pykv {command}: {problem}", file=sys.stderr)
    return 2


# --- get -------------------------------------------------------------------------------------


def add_get_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", nargs="?")
    _connect_args(parser)


def run_get(args: argparse.Namespace) -> int:
    if (problem := _reclaim(args, ("key",), "KEY")) is not None:
        return _usage_error("get", problem)
    try:
        with _store(args, writes=False) as db:
            value = db.get(args.key, _MISSING)
    except Error as exc:
        return _fail(exc)
    if value is _MISSING:
        return 1
    print(json.dumps(_to_json(value)))
    return 0


# --- put -------------------------------------------------------------------------------------


def add_put_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", nargs="?")
    parser.add_argument("value", nargs="?")
    parser.add_argument("--type", choices=["str", "int", "json"], default="str")
    _connect_args(parser)


def run_put(args: argparse.Namespace) -> int:
    if (problem := _reclaim(args, ("key", "value"), "KEY VALUE")) is not None:
        return _usage_error("put", problem)
    try:
        value = parse_value(args.value, args.type)
        with _store(args, writes=True) as db:
            db.put(args.key, value)
    except Error as exc:
        return _fail(exc)
    return 0


# --- txn -------------------------------------------------------------------------------------

OPS = ("get", "put", "incr", "append", "delete")


def parse_op(text: str) -> tuple[str, str, str | None]:
    """``put:key=value`` -> ("put", "key", "value"); the value part is optional for some."""
    op, sep, rest = text.partition(":")
    if not sep or op not in OPS:
        raise argparse.ArgumentTypeError(f"an operation is OP:KEY[=VALUE] with OP in {OPS}: {text!r}")
    key, eq, value = rest.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"operation {text!r} has no key")
    if op in ("put", "append") and not eq:
        raise argparse.ArgumentTypeError(f"{op} needs KEY=VALUE: {text!r}")
    return op, key, value if eq else None


def add_txn_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ops", nargs="*", type=parse_op, metavar="OP:KEY[=VALUE]")
    parser.add_argument("--type", choices=["str", "int", "json"], default="str",
                        help="how put/append values are parsed")
    parser.add_argument("--isolation", default="serializable")
    _connect_args(parser)


def run_txn(args: argparse.Namespace) -> int:
    # `--addresses A B get:x` makes argparse hand the operations to --addresses: take them back.
    ops = list(args.ops)
    addresses = []
    for item in args.addresses or []:
        if item.partition(":")[0] in OPS:
            ops.append(parse_op(item))
        else:
            addresses.append(item)
    if not ops or not (addresses or args.data_dir):
        return _usage_error("txn", "needs at least one OP:KEY[=VALUE] and one address (or --data-dir)")
    args.ops, args.addresses = ops, addresses or None
    results: dict[str, Any] = {}
    try:
        with _store(args, writes=any(op != "get" for op, _, _ in ops)) as db:
            with db.transaction(args.isolation) as tx:
                for position, (op, key, raw) in enumerate(args.ops):
                    if op == "get":
                        results[f"{position}:{key}"] = _to_json(tx.get(key))
                    elif op == "put":
                        tx.put(key, parse_value(raw, args.type))
                    elif op == "incr":
                        tx.incr(key, int(raw) if raw is not None else 1)
                    elif op == "append":
                        tx.append(key, parse_value(raw, args.type))
                    else:
                        tx.delete(key)
    except Error as exc:
        return _fail(exc)
    except ValueError as exc:
        print(f"pykv: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results))
    return 0


# --- scan ------------------------------------------------------------------------------------


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", nargs="?", help="keys starting with this (default: all)")
    parser.add_argument("--start", help="first key (inclusive)")
    parser.add_argument("--end", help="end key (exclusive)")
    parser.add_argument("--limit", type=int, help="at most this many keys")
    parser.add_argument("--plain", action="store_true",
                        help="one pass printed as it is read, not one snapshot (scan consistent=False)")
    _connect_args(parser)


def run_scan(args: argparse.Namespace) -> int:
    _reclaim(args, ("prefix?",), "PREFIX")  # optional: never an error
    try:
        with _store(args, writes=False) as db:
            items = db.scan(args.prefix or "", start=args.start, end=args.end, limit=args.limit,
                            consistent=not args.plain)
            for key, value in items:
                print(json.dumps({"key": key, "value": _to_json(value)}))
    except Error as exc:
        return _fail(exc)
    return 0


# --- resolvers -------------------------------------------------------------------------------


def add_resolvers_arguments(parser: argparse.ArgumentParser) -> None:
    change = parser.add_mutually_exclusive_group()
    change.add_argument("--set", nargs=2, metavar=("PREFIX", "NAME"),
                        help=f"use the built-in resolver NAME ({', '.join(sorted(BUILTIN))}) for keys starting with PREFIX")
    change.add_argument("--unset", metavar="PREFIX", help="forget the resolver registered for exactly PREFIX")
    _connect_args(parser)


def run_resolvers(args: argparse.Namespace) -> int:
    """Print the registered resolvers as one JSON object {prefix: name}, after --set or
    --unset if given (they are kept with the data: see KeyValueStore.register_resolver)."""
    try:
        with _store(args, writes=args.set is not None or args.unset is not None) as db:
            if args.set is not None:
                db.register_resolver(*args.set)
            elif args.unset is not None:
                db.unregister_resolver(args.unset)
            print(json.dumps(db.resolvers()))
    except Error as exc:
        return _fail(exc)
    return 0
