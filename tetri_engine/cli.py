"""`tetri-engine` command line: one sub-command per module in tetri_engine.commands.

Each command module has `add_arguments(parser)` and `run(args) -> int`; it is imported only when
its command runs, so `tetri-engine simulate` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": ("tetri_engine.commands.serve", "HTTP server (OpenAI-compatible image API)"),
    "demo": ("tetri_engine.commands.demo", "replay a short mixed trace through the embedded engine"),
    "simulate": ("tetri_engine.commands.simulate", "replay traces through scheduling policies on simulated GPUs"),
    "profile": ("tetri_engine.commands.profile", "measure the step-time profile of a model on these devices"),
    "analyze-redundancy": ("tetri_engine.commands.analyze_redundancy", "step-to-step redundancy of a model's attention"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tetri-engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}")  # exits with status 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"tetri-engine {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)
