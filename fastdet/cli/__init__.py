"""The ``fastdet`` command line: ``demo``, ``train``, ``eval``, ``predict``, ``proposals``, ``convert``, ``bench``,
``showcase``.

Thin: each sub-command parses its arguments and calls the library (fastdet.data / models / engine / eval).

Exit codes: 0 success; 1 the command ran but a check failed (showcase or bench results that differ from torchvision,
demo targets missed with --require-targets); 2 bad arguments or bad input (missing or malformed files, unknown
model, ...), reported in one line without a traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from fastdet.cli import bench, convert, demo, evaluate, predict, proposals, showcase, train
from fastdet.cli._common import EXIT_INTERRUPTED, EXIT_USAGE, CommandError

COMMANDS = (demo, train, evaluate, predict, proposals, convert, bench, showcase)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdet", description="fastdet: fast detection kernels, detectors, training and evaluation.",
        epilog="Exit codes: 0 success, 1 a result check failed, 2 bad arguments or input, 130 interrupted. "
               "Run `fastdet <command> --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fastdet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CommandError as exc:
        print(f"fastdet {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # The library's argument and data checks (DatasetError is a ValueError) name the problem and the file; a
        # traceback adds nothing for a command-line user. FASTDET_DEBUG=1 shows it.
        import os

        if os.environ.get("FASTDET_DEBUG"):
            raise
        print(f"fastdet {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
