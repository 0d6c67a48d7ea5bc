"""The package type-checks: ``py.typed`` hands its hints to every user's
type checker, so they must hold.  mypy over ``pimcore/`` (its default
settings); skipped without mypy (``pip install -e '.[test]'`` has it).
A staticmethod that used ``self`` -- a NameError on a rare path, which no
test reached -- was what mypy found the first time it ran here."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_type_checks(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e '.[test]')")
    out, err, status = api.run(["--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(ROOT / "pimcore")])
    assert status == 0, out + err
