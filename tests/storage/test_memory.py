"""Bounded memory: 1 GiB of values through a 64 MiB cache keeps the process small (DESIGN §5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Runs in a child so that its peak RSS measures this workload alone, not the test runner. The
# peak is the child's VmHWM: ru_maxrss would also count the runner's RSS at the fork (Linux
# keeps the largest of the process's address spaces, the one before exec included), which
# after the rest of the suite was 393 MB and failed this test in a clean-clone run.
CHILD = r"""
import json, os, sys, threading
import xxhash
from pykv.storage import Storage, Update

path, total_bytes = sys.argv[1], int(sys.argv[2])
VALUE = 64 << 10
PER_COMMIT = 4
THREADS = 8
count = total_bytes // VALUE
block = os.urandom(2 * VALUE)

def value(i):
    start = (i * 7919) % VALUE
    return i.to_bytes(8, "little") + block[start:start + VALUE - 8]

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
store = Storage.open(path, cache_bytes=64 << 20, fsync="always")

def writer(t):
    for first in range(t * PER_COMMIT, count, THREADS * PER_COMMIT):
        store.commit([Update(b"v%08d" % i, value(i), b"", i)
                      for i in range(first, min(first + PER_COMMIT, count))])

threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
for t in threads: t.start()
for t in threads: t.join()
after_write = peak_rss()

bad = [i for i in range(count)
       if xxhash.xxh64_intdigest(store.get(b"v%08d" % i).value) != xxhash.xxh64_intdigest(value(i))]
stats = store.stats()
store.close()
store = Storage.open(path, cache_bytes=64 << 20)  # restart from the hint written by close()
bad += [i for i in range(0, count, 97) if store.get(b"v%08d" % i).value != value(i)]
keys_after_reopen = store.stats()["keys"]
store.close()
print(json.dumps({
    "values": count, "bad": bad[:10], "keys_after_reopen": keys_after_reopen,
    "peak_rss_bytes": peak_rss(),
    "peak_rss_after_write_bytes": after_write,
    "keydir_bytes": stats["keydir_bytes"], "key_index_bytes": stats["key_index_bytes"],
    "cache_bytes": stats["cache_bytes"], "live_bytes": stats["live_bytes"],
    "cache_hits": stats["cache_hits"], "cache_misses": stats["cache_misses"],
}))
"""


@pytest.mark.slow
def test_one_gib_of_values_with_a_64_mib_cache_keeps_rss_bounded(tmp_path: Path) -> None:
    path = tmp_path / "db"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(1 << 30)], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    print(report)
    assert report["bad"] == [] and report["keys_after_reopen"] == report["values"] == 16384
    assert report["live_bytes"] == 1 << 30
    assert report["cache_bytes"] <= 64 << 20
    # Values stay on disk: what the process holds is the key directory, the 64 MiB cache, the
    # WAL's group-commit buffers (up to 64 MiB queued + the batch being written) and Python.
    bound = report["keydir_bytes"] + report["key_index_bytes"] + (64 << 20) + (300 << 20)
    assert report["peak_rss_bytes"] < min(bound, 400 << 20), report
