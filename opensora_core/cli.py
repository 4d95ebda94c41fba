"""Shared pieces of every stage CLI: ``--params``/``--set``, exit codes, the summary line.

A stage module defines a core function and a small ``main()``::

    def main(argv=None) -> int:
        parser = build_parser("Ingest clips into data/raw/.")
        parser.add_argument("--output", default="data/raw")
        return run_cli(parser, argv, lambda args, cfg: ingest(cfg.ingest, Path(args.output)))

``run_cli`` loads the configuration, runs the stage, prints its one-line summary and turns the
errors of :mod:`opensora_core.errors` into their exit codes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from opensora_core.config import Config, load_config
from opensora_core.errors import StageError

log = logging.getLogger("opensora")


def build_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the options every stage shares."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter (repeatable), e.g. --set ingest.num_clips=20",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


OWN_LOGGERS = ("opensora", "opensora_core", "tasks", "flows")


def _own_or_warning(record: logging.LogRecord) -> bool:
    # Some libraries (great_expectations) set their module loggers to INFO on import, so a level
    # on their parent logger is not enough to keep them out of the stage's output.
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_LOGGERS


def setup_logging(quiet: bool = False) -> None:
    """Our loggers at INFO (WARNING when quiet); third-party libraries only at WARNING."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_own_or_warning)


def run_cli(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    stage: Callable[[argparse.Namespace, Config], Any],
    name: str | None = None,
) -> int:
    """Parse ``argv``, load the config, run ``stage(args, cfg)`` and map errors to exit codes.

    ``stage`` returns a one-line summary string (or an object whose ``str`` is one), printed last.
    """
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "quiet", False))
    name = name or parser.prog
    start = time.perf_counter()
    try:
        cfg = load_config(args.params, args.overrides)
        summary = stage(args, cfg)
    except StageError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"{name}: failed with an unexpected error (see the traceback above)", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    if summary is not None:
        print(f"{name}: {summary} [{elapsed:.1f}s]")
    return 0
