"""One import namespace: the distribution installs ``fedsocial`` only (issue 15, item 2).

The repository keeps DESIGN.md's top-level folders; ``fedsocial/<name>`` links to each, so the wheel
holds ``fedsocial.shared``, ``fedsocial.client``, ... and nothing named ``shared`` or ``server`` that
could collide with another project's packages in site-packages.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SOURCE_FOLDERS = ("shared", "client", "server", "simulations", "tests", "fedsocial")


def _tracked_source(dest: Path) -> Path:
    """A copy of the files a clean clone has (no build/, no egg-info), symlinks kept as links."""
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(src.readlink())
        elif src.is_file():
            shutil.copy2(src, dst)
    return dest


def test_the_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    # Prepare
    src = _tracked_source(tmp_path / "src")

    # Execute
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)

    # Assert
    (wheel,) = (tmp_path / "dist").glob("fedsocial-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"fedsocial"}, top
    for module in ("shared/config.py", "shared/privacy/ledger.py", "client/app.py", "server/app.py",
                   "simulations/cli.py", "__main__.py"):
        assert f"fedsocial/{module}" in names, module


def test_version_and_module_entry_point() -> None:
    from fedsocial import __version__

    out = subprocess.run([str(BIN / "fedsocial"), "--version"], capture_output=True, text=True, timeout=60)
    module = subprocess.run([sys.executable, "-m", "fedsocial", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=str(Path("/")))

    assert out.returncode == 0 and out.stdout.strip() == f"fedsocial {__version__}"
    assert __version__[0].isdigit() and "unknown" not in __version__
    assert module.returncode == 0 and "usage: fedsocial" in module.stdout


def test_no_module_imports_a_bare_top_level_package() -> None:
    # A stray `import shared` works from the repository root but not once installed.
    bare = {"shared", "client", "server", "simulations"}
    offenders = []
    for folder in SOURCE_FOLDERS[:-1]:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                offenders += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names if n.split(".")[0] in bare]
    assert not offenders, offenders


def test_flower_components_are_named_in_the_namespace() -> None:
    import tomllib

    components = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]

    assert components == {"serverapp": "fedsocial.server.app:app", "clientapp": "fedsocial.client.app:app"}
