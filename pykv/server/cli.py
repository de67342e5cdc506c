"""The `pykv` command line: one subcommand per module in pykv/server/cmd_*.py."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from pykv.client.router import split_addresses

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("pykv.server.cmd_bench", "run a transactional workload and print tps and latency"),
    "sim": ("pykv.server.cmd_sim", "run the deterministic simulator over many seeds"),
    "serve": ("pykv.server.cmd_serve", "run one cluster node"),
    "cluster": ("pykv.server.cmd_cluster", "start or stop a local cluster of node processes"),
    "status": ("pykv.server.cmd_status", "print a table of nodes and shards"),
    "get": ("pykv.server.cmd_kv", "read a key"),
    "put": ("pykv.server.cmd_kv", "write a key"),
    "txn": ("pykv.server.cmd_kv", "run a transaction of reads and writes"),
    "scan": ("pykv.server.cmd_kv", "print the keys of a range and their values, in key order"),
    "resolvers": ("pykv.server.cmd_kv", "list, register (--set) or forget (--unset) conflict resolvers"),
    "check": ("pykv.server.cmd_check", "read every value of an embedded store; list the damaged"),
    "backup": ("pykv.server.cmd_backup", "copy an embedded store no process has open, or a cluster, verified"),
    "restore": ("pykv.server.cmd_restore", "load a backup (an embedded store) into a cluster"),
    "salvage": ("pykv.server.cmd_salvage", "copy an embedded store damaged mid-WAL into one that opens"),
}


class _Addresses(argparse.Action):
    """--addresses A B, or A,B: one flat list (checked as HOST:PORT when used: `--addresses
    A B key` hands its trailing positional to the option, and the command takes it back)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, split_addresses(values))


def add_addresses_argument(parser: Any, *, required: bool = False, help: str | None = None) -> None:  # noqa: A002 - argparse's name
    """The --addresses option of the commands that talk to a cluster (``parser``: a parser
    or an argument group)."""
    parser.add_argument("--addresses", nargs="+", action=_Addresses, required=required,
                        metavar="HOST:PORT", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pykv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text)
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(p)
        p.set_defaults(_run=getattr(module, f"run_{name}", None) or module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: each command leaves nothing half-written behind it
        print(f"pykv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
