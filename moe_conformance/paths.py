"""Where the suites and built-in arch plugins live: inside the wheel (force-included as
``_suites``/``_archs``) or, in a checkout, beside the package."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _locate(name: str) -> Path:
    packaged = _PACKAGE / f"_{name}"
    return packaged if packaged.is_dir() else _PACKAGE.parent / name


def suites_dir() -> Path:
    return _locate("suites")


def archs_dir() -> Path:
    return _locate("archs")


def fixtures_dir() -> Path:
    return _locate("fixtures")
