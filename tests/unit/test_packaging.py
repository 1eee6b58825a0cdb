"""pyproject.toml lists the wheel's packages by hand (the migrations are mapped in from outside tusingest/);
a package added under tusingest/ and not listed there would be left out of the wheel."""

import tomllib
from pathlib import Path

import tusingest

ROOT = Path(tusingest.__file__).resolve().parents[1]


def test_every_package_under_tusingest_and_the_migrations_are_in_the_wheel() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "tusingest").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }

    assert set(setuptools["packages"]) == on_disk | {"tusingest._migrations", "tusingest._migrations.versions"}
    assert setuptools["package-dir"] == {"tusingest._migrations": "migrations"}
