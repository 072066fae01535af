"""Docs hygiene: no paths of one machine in tracked docs and configs, and the commands in README.md and
docs/*.md name subcommands, modules, configs and Make targets that exist (run from the repository root)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from fedsocial.simulations.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(?<![\w.~$])/(?:work|tmp|root|home)/")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / line for line in out.stdout.splitlines() if line]


def doc_files() -> list[Path]:
    return [p for p in tracked("*.md") if p.is_file()]


def command_lines(path: Path) -> list[tuple[int, str]]:
    """Lines inside fenced code blocks and inline `...` spans that start a project command."""
    out, fenced = [], False
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        spans = [line] if fenced else re.findall(r"`([^`]+)`", line)
        for span in spans:
            span = span.strip()
            if re.match(r"(\S+=\S+ )*(\.venv/bin/(fedsocial|python)|make) ", span):
                out.append((k, span.split("  #")[0].split(" # ")[0]))
    return out


def test_no_machine_paths_in_tracked_docs_and_configs() -> None:
    # Prepare
    files = doc_files() + [p for p in tracked("*.toml", "*.py") if "tests/" not in str(p.relative_to(REPO))]
    # Execute
    hits = [f"{p.relative_to(REPO)}:{k}: {line.strip()}" for p in files if p.is_file()
            for k, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
            if MACHINE_PATH.search(line)]
    # Assert
    assert hits == []


def _check(path: Path, line_no: int, text: str, targets: set[str]) -> list[str]:
    where = f"{path.relative_to(REPO)}:{line_no}"
    try:
        words = shlex.split(text.replace("\\", " "))
    except ValueError:
        return []
    while words and re.match(r"^\w+=", words[0]):
        words.pop(0)  # environment assignments
    problems = []
    if words[:1] == ["make"]:
        problems += [f"{where}: no Make target {w!r}" for w in words[1:2] if not w.startswith("-") and w not in targets]
    elif words[:1] == [".venv/bin/fedsocial"] and len(words) > 1 and not words[1].startswith("-"):
        if words[1] not in COMMANDS:
            problems.append(f"{where}: no fedsocial command {words[1]!r}")
    elif (words[:2] == [".venv/bin/python", "-m"] and len(words) > 2 and words[2].startswith("fedsocial")
          and importlib.util.find_spec(words[2]) is None):
        problems.append(f"{where}: no module {words[2]!r}")
    for flag, value in zip(words, words[1:], strict=False):
        if flag == "--config" and value.startswith("configs/") and not (REPO / value).is_file():
            problems.append(f"{where}: no config {value!r}")
    return problems


def test_doc_commands_name_what_exists_from_the_repository_root() -> None:
    # Prepare
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    # Execute
    problems = [p for path in doc_files() for k, text in command_lines(path) for p in _check(path, k, text, targets)]
    commands = [text for path in doc_files() for _, text in command_lines(path)]
    # Assert: something was checked, and nothing named is missing
    assert len(commands) > 20
    assert problems == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_cli_command_module_exists(name: str) -> None:
    # Prepare
    module = COMMANDS[name][0]
    # Execute / Assert: the module the CLI dispatches to is importable from the repository root
    assert importlib.util.find_spec(module) is not None, f"fedsocial {name}: module {module} missing"
