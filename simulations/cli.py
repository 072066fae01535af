"""The ``fedsocial`` command line: one entry point, subcommands implemented in their own modules.

Each subcommand module exposes ``main(argv) -> int``; errors that are the user's (bad config, bad
data, bad ledger) are printed as one line naming the file, line or key, without a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

# Flower must never install packages at run time or phone home; keep its state inside the project.
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_HOME", os.path.join(os.getcwd(), ".flwr"))

COMMANDS: dict[str, tuple[str, str, str]] = {  # name: (module, function, help)
    "train": ("fedsocial.simulations.train", "main", "centralized training and full-ranking evaluation"),
    "simulate": ("fedsocial.simulations.simulate", "main", "federated simulation (Flower, in-process)"),
    "audit": ("fedsocial.simulations.audit", "main", "verify privacy ledgers and recompute the budget"),
    "partition": ("fedsocial.simulations.partition_cmd", "main", "write one self-contained folder per partner"),
    "certs": ("fedsocial.simulations.certs", "main_certs", "make a CA and a SuperLink TLS certificate"),
    "keys": ("fedsocial.simulations.certs", "main_keys", "make a partner's SuperNode and ledger keys"),
    "canary-audit": ("fedsocial.simulations.canary_audit", "main", "empirical lower bound on epsilon (canaries)"),
    "bench": ("fedsocial.simulations.bench", "main", "run the benchmark harness"),
    "init": ("fedsocial.simulations.init_cmd", "main", "write a config sized to a CSV data set"),
    "recommend": ("fedsocial.simulations.recommend", "main", "top-K lists with explanations for a partner's users"),
    "serve": ("fedsocial.simulations.serve", "main", "a partner's recommendation service and page (HTTP)"),
}


def _usage() -> str:
    lines = ["usage: fedsocial [--version] COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines.append("\n`fedsocial COMMAND --help` for a command's options.")
    return "\n".join(lines)


def _resolve(name: str) -> Callable[[list[str]], int]:
    module_name, func, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, func)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from fedsocial import __version__

        print(f"fedsocial {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"fedsocial: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(_resolve(name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
