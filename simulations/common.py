"""Pieces every ``fedsocial`` subcommand shares: config arguments, user-facing errors, JSON output."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.config import Config, ConfigError, load_config
from shared.data import DataError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError)
EXIT_USER_ERROR = 2


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--data-dir`` and repeatable ``--set section.key=value``."""
    parser.add_argument("--config", required=True, help="TOML config, e.g. configs/demo.toml")
    parser.add_argument("--data-dir", default=None,
                        help="folder that dataset paths are relative to (default: $FEDSOCIAL_DATA_DIR or ./data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key with a typed value (repeatable)")


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    return load_config(args.config, list(args.overrides) + list(extra or []))


def user_errors(func: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn the user's mistakes into one clear line on stderr and exit code 2, no traceback."""

    @functools.wraps(func)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return func(argv)
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def format_table(rows: list[tuple[str, str]], title: str = "") -> str:
    """A two-column plain-text table for terminal summaries."""
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
