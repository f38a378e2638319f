"""`jaxpage` command line: convert | serve | bench."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining add_arguments(parser) and run(args) -> int
_COMMANDS = {
    "convert": ("jaxpage.convert", "Convert a Hugging Face or official Gemma checkpoint"),
    "serve": ("jaxpage.server", "Serve the OpenAI-compatible HTTP API"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="jaxpage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{convert,serve,bench}")
    # Import only the subcommand being run (each pulls in heavy dependencies of its own).
    wanted = [argv[0]] if argv and argv[0] in _COMMANDS else list(_COMMANDS)
    modules = {}
    for name, (module_name, help_text) in _COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name in wanted:
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(sub_parser)
    sub.add_parser("bench", help="Run a benchmark: jaxpage bench NAME [args] (see benchmarks/)")
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


def _bench(argv: list[str]) -> int:
    from jaxpage.benchmarks import BENCHMARKS  # noqa: PLC0415

    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: jaxpage bench {{{','.join(BENCHMARKS)}}} [args]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"jaxpage.benchmarks.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
