"""Pieces every ``fedsocial`` subcommand shares: config arguments, user-facing errors, JSON output."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from fedsocial.shared.config import Config, ConfigError, load_config
from fedsocial.shared.data import DataError

# The user's own file-system mistakes too: --out naming a file or a path under one, a folder where a file
# belongs, a place they may not write. The message names the path.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError, FileExistsError,
                                                NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_USER_ERROR = 2


def compute_error_line(exc: BaseException) -> str:
    """One line for a user error: an OS error as ``PATH: what is wrong with it``, else the message."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        hint = {FileExistsError: " (a file is in the way of a folder)",
                NotADirectoryError: " (a part of this path is a file, not a folder)"}.get(type(exc), "")
        return f"{exc.filename}: {exc.strerror}{hint}"
    return str(exc)


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
            print(f"error: {compute_error_line(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return exit_interrupted()

    return wrapper


def _shutdown_ray(ray: Any) -> None:
    try:
        if ray.is_initialized():
            ray.shutdown()  # stops the actors, raylet and GCS this driver started
    except Exception:  # noqa: BLE001 - interrupted: stopping is best effort, the exit follows regardless
        pass


def exit_interrupted(wait_s: float = 15.0) -> int:
    """130 after Ctrl-C; where a simulation's Ray and Flower threads would keep the interpreter alive (found in
    review: ``simulate`` printed "interrupted" and then hung in ``threading._shutdown``), stop Ray (at most
    ``wait_s``) and leave at once. Everything saved is already on disk (atomic writes): nothing is lost."""
    ray = sys.modules.get("ray")
    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if ray is None or not others:
        return 130
    stopper = threading.Thread(target=_shutdown_ray, args=(ray,), daemon=True)
    stopper.start()
    stopper.join(wait_s)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def format_table(rows: list[tuple[str, str]], title: str = "") -> str:
    """A two-column plain-text table for terminal summaries."""
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
