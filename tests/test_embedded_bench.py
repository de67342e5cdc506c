"""`pykv bench --embedded`: the standard workload runs, reports, and leaves stdout clean for --json."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pykv
from pykv.server.cli import main
from pykv.server.workload import key_name

SHORT = ["bench", "--embedded", "--threads", "3", "--duration", "0.5", "--keys", "300"]


def test_json_prints_exactly_one_object_with_the_figures(capsys):
    assert main([*SHORT, "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # exactly one JSON document: no progress bar on stdout
    assert out.strip().count("\n") == 0
    for field in ("tps", "p50_ms", "p99_ms", "aborts", "errors", "committed"):
        assert field in report
    assert report["committed"] > 0 and report["tps"] > 0
    assert report["errors"] == 0
    assert 0 < report["p50_ms"] <= report["p99_ms"]
    assert report["clients"] == 3 and report["ops_per_txn"] == 4


def test_table_output_and_a_kept_data_dir(tmp_path, capsys):
    data = tmp_path / "bench-data"
    assert main([*SHORT, "--data-dir", str(data), "--ops", "6"]) == 0
    out = capsys.readouterr().out
    assert "tps" in out and "p99 ms" in out and "abort rate" in out
    with pykv.open(data) as db:  # the preloaded keys and the workload's writes are durable
        assert len(list(db.scan("bench/"))) == 300
        assert isinstance(db.get(key_name(0)), bytes)


def test_bad_workload_arguments_exit_with_an_error(capsys):
    assert main(["bench", "--embedded", "--ops", "1", "--duration", "0.1"]) == 2
    assert "ops" in capsys.readouterr().err


def test_a_store_that_cannot_be_opened_is_an_error_not_a_traceback(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pykv.open(tmp_path / "busy"):  # held open: another bench cannot take it
        assert main(["bench", "--data-dir", str(tmp_path / "busy"), "--duration", "0.1"]) == 2
        assert "cannot open the store" in capsys.readouterr().err
    assert main(["bench", "--data-dir", str(tmp_path / "notes.txt"), "--duration", "0.1"]) == 2
    assert "is a file, not a store's directory" in " ".join(capsys.readouterr().err.split())


def test_ctrl_c_is_one_line_and_exit_130_not_a_traceback(tmp_path):
    """SIGINT (Ctrl-C) to a running `pykv bench` process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykv.server.cli", "bench", "--embedded", "--duration", "60",
         "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "data").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the workload
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "pykv bench: interrupted" in err and "Traceback" not in err
