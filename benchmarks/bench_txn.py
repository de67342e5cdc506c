"""OCC validation cost of the standard 4-op transaction against a plain-dict baseline.

The 4-op transaction (DESIGN §7): reads 2 keys and writes 2 keys (one read-modify-write,
one blind write), keys uniform over 100,000, values of 100 bytes. Each round runs a batch
of BATCH different transactions, so a figure divided by BATCH is the cost of one.

From the repo root; the pytest form works as is (``python3 -m`` puts the root on
sys.path and benchmarks/conftest.py collects bench_*.py), the script form needs pykv
installed (``pip install -e .``):

    python3 -m pytest benchmarks/bench_txn.py -q   # speed (pytest-benchmark table)
    python3 benchmarks/bench_txn.py                # validate() vs the dict baseline, same run
"""

from __future__ import annotations

import random
import sys
import timeit

from pykv.txn import CommitRequest, DictState, ResolverRegistry, WriteOp, validate
from pykv.types import OpKind

KEYS = 100_000
BATCH = 1_000
VALUE = "v" * 100


def _populated() -> tuple[dict, DictState]:
    """The same 100,000 keys in a plain dict and in a DictState (each key written once)."""
    plain = {f"key{i}": VALUE for i in range(KEYS)}
    state = DictState()
    writes = tuple(WriteOp(key, OpKind.PUT, VALUE) for key in plain)
    request = CommitRequest(0, 1, {}, writes)
    state.apply(validate(request, state, ResolverRegistry(), max_ops=KEYS))
    return plain, state


def _picks(seed: int = 7) -> list[tuple[str, str, str]]:
    """(read-modify-write key, read-only key, blind-write key) per transaction."""
    rng = random.Random(seed)
    return [tuple(f"key{rng.randrange(KEYS)}" for _ in range(3)) for _ in range(BATCH)]


PLAIN, STATE = _populated()
PICKS = _picks()
RESOLVERS = ResolverRegistry()


def _request(txid: int, rmw: str, read: str, blind: str) -> CommitRequest:
    seen_rmw, seen_read = STATE.get(rmw), STATE.get(read)
    return CommitRequest(
        txid,
        1,
        {rmw: seen_rmw, read: seen_read},
        (WriteOp(rmw, OpKind.PUT, VALUE[:-1] + "w", seen_rmw), WriteOp(blind, OpKind.PUT, VALUE)),
        timestamp=txid,
    )


REQUESTS = [_request(i, *keys) for i, keys in enumerate(PICKS)]


def baseline_dict_ops() -> None:
    """The same four operations on a dict, with no versions and no checks."""
    data = PLAIN
    for rmw, read, blind in PICKS:
        current = data[rmw]
        data[read]
        data[rmw] = current[:-1] + "w"
        data[blind] = VALUE


def validate_batch() -> None:
    """validate() of BATCH 4-op transactions against the DictState (nothing applied)."""
    for request in REQUESTS:
        validate(request, STATE, RESOLVERS)


def validate_and_apply_batch() -> None:
    """Build, validate and apply BATCH transactions, each reading the latest versions."""
    for i, keys in enumerate(PICKS):
        STATE.apply(validate(_request(i, *keys), STATE, RESOLVERS))


def test_baseline_dict_ops(benchmark):
    benchmark(baseline_dict_ops)


def test_validate_4op(benchmark):
    benchmark(validate_batch)


def test_build_validate_apply_4op(benchmark):
    benchmark(validate_and_apply_batch)


def figures(out=sys.stdout) -> None:
    """Best-of-5 time per transaction of each variant, and the ratios to the baseline."""

    def per_txn_us(fn) -> float:
        return min(timeit.repeat(fn, number=20, repeat=5)) / (20 * BATCH) * 1e6

    base = per_txn_us(baseline_dict_ops)
    valid = per_txn_us(validate_batch)
    full = per_txn_us(validate_and_apply_batch)
    print(f"4-op transaction (2 reads, 2 writes), {KEYS} keys, 100-byte values", file=out)
    print(f"  plain dict ops            {base:8.3f} us/txn   1.0x", file=out)
    print(f"  validate()                {valid:8.3f} us/txn  {valid / base:5.1f}x", file=out)
    print(f"  build+validate()+apply()  {full:8.3f} us/txn  {full / base:5.1f}x", file=out)


if __name__ == "__main__":
    figures()
