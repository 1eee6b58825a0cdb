"""An installed wheel migrates its own database: `pip install` of tusingest, then `tusingest migrate`.

The wheel is built from a copy of the source tree (so the checkout stays clean) and installed without
its dependencies into a fresh venv, which reaches the test venv's site-packages for those through a
.pth file. That venv's `tusingest` is the wheel's: the test checks where it imports from, away from the
checkout, so the migrations it runs are the ones the wheel carries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tusingest.sessions import migrations

pytestmark = pytest.mark.slow  # builds a wheel: 10-30 s

SOURCE = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the wheel of this tree installed; returns its bin directory."""
    root = tmp_path_factory.mktemp("wheel")
    tree = root / "tree"
    tree.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("tusingest", "migrations"):
        shutil.copytree(SOURCE / name, tree / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(SOURCE / name, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(root / "dist"), str(tree)], check=True)
    (wheel,) = (root / "dist").glob("tusingest-*.whl")
    (root / "wheel-names.txt").write_text("\n".join(zipfile.ZipFile(wheel).namelist()))

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies come from the test venv. Its editable finder for tusingest stays inactive there:
    # a directory named in a .pth file does not have its own .pth files run.
    (Path(site) / "test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def run(bin_dir: Path, *args: str, database_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_installed_package_carries_its_migrations_away_from_the_checkout(installed: Path, tmp_path: Path) -> None:
    code = "import tusingest.sessions.migrations as m, tusingest; print(tusingest.__file__, m.scripts_dir())"

    done = run(installed, str(installed / "python"), "-c", code, database_url="sqlite:///unused", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    package, scripts = done.stdout.split()
    assert Path(package).is_relative_to(installed.parent) and not Path(package).is_relative_to(SOURCE)
    assert Path(scripts) == Path(package).parent / "_migrations"


async def test_tusingest_migrate_from_the_wheel_brings_a_new_postgres_database_to_head(
    installed: Path, empty_postgres_url: str, tmp_path: Path
) -> None:
    done = run(installed, str(installed / "tusingest"), "migrate", database_url=empty_postgres_url, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert await migrations.current_revision(empty_postgres_url) == migrations.head_revision()


def test_tusingest_migrate_from_the_wheel_creates_an_sqlite_file_at_head(installed: Path, tmp_path: Path) -> None:
    path = tmp_path / "data" / "tusingest.db"

    done = run(installed, str(installed / "tusingest"), "migrate", database_url=f"sqlite:///{path}", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert migrations.read_sqlite_revision(db) == migrations.head_revision()


def test_the_wheel_carries_the_built_console_and_not_its_npm_project(installed: Path, tmp_path: Path) -> None:
    names = set((installed.parents[1] / "wheel-names.txt").read_text().splitlines())
    code = "from tusingest.console import asset; import hashlib; print(hashlib.sha256(asset('console.js')).hexdigest())"

    done = run(installed, str(installed / "python"), "-c", code, database_url="sqlite:///unused", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    built = SOURCE / "tusingest" / "console" / "static" / "console.js"
    assert done.stdout.strip() == hashlib.sha256(built.read_bytes()).hexdigest()
    console = {name for name in names if name.startswith("tusingest/console/")}
    assert console == {
        "tusingest/console/__init__.py",
        "tusingest/console/static/index.html",
        "tusingest/console/static/console.js",
        "tusingest/console/static/console.css",
    }
