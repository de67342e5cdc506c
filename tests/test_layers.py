"""The import arrows of DESIGN §6 point down only, and raft/ and txn/ do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pykv"

# A module may import only layers of a lower rank (or its own layer).
RANK = {
    "errors": 0,
    "types": 1,
    "_engine": 1,
    "config": 2,
    "codec": 3,
    "storage": 4,
    "raft": 4,
    "txn": 4,
    "cluster": 4,
    "net": 4,
    "api": 5,
    "replica": 6,
    "embedded": 6,
    "client": 7,
    "sim": 7,
    "aio": 8,
    "__init__": 8,
    "server": 9,
}

# Layers that must stay deterministic and I/O-free, so that the simulator can drive them.
PURE_LAYERS = {"raft", "txn", "cluster"}
IO_MODULES = {
    "socket", "asyncio", "uvloop", "selectors", "select", "subprocess", "time", "datetime",
    "threading", "os", "io", "pathlib", "shutil", "tempfile", "mmap", "signal",
}
# ConsensusModule is the in-process, real-timer driver of a Raft group that the public API
# places at pykv.raft; it is the one module of raft/ allowed threads and a clock.
PURE_EXEMPT = {"raft/consensus.py"}


def _layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    layer = _layer_of(path)
    assert layer in RANK, f"{layer} has no rank in DESIGN §6; add it to RANK"
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "pykv" or len(parts) == 1:
            continue
        target = parts[1]
        if target == layer:
            continue
        assert target in RANK, f"{path.name} imports unknown layer {name}"
        assert RANK[target] < RANK[layer], f"{path.relative_to(PACKAGE)} imports {name} (up or sideways)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_layers_do_no_io(path: Path) -> None:
    rel = str(path.relative_to(PACKAGE))
    if _layer_of(path) not in PURE_LAYERS or rel in PURE_EXEMPT:
        return
    for name in _imports(path):
        assert name.split(".")[0] not in IO_MODULES, f"{rel} imports {name}: no I/O or clocks here"


def test_every_module_says_what_it_owns() -> None:
    missing = [
        str(p.relative_to(PACKAGE))
        for p in MODULES
        if not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not missing, f"modules without a one-line docstring: {missing}"
