"""What this release of moe-conformance is tested against, and how to say so.

The README commands install from the committed locks (requirements/lock*.txt, made by
scripts/lock.sh); CI runs the conformance suite on both ends of TESTED_TRANSFORMERS. Outside the
range the suite still runs, and the report header and the JSON report say that it is untested.
Importing this module costs nothing (no torch, no transformers).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# (oldest, newest) transformers releases CI runs the conformance suite on: requirements/
# lock-oldest.txt and requirements/lock.txt pin exactly these.
TESTED_TRANSFORMERS = ("5.20.0", "5.24.0")
TESTED_TORCH = ("2.11.0", "2.13.0")  # 2.13 CPU in CI; 2.11 (cu130) on the GPU runs


def _release(v: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(v).release


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def untested(package: str, tested: tuple[str, str], have: str | None = None) -> str | None:
    """A warning when the installed ``package`` is outside ``tested`` (None: inside or absent)."""
    have = have or installed(package)
    if have is None:
        return None
    low, high = tested
    # compare releases only: 5.24.0.dev0 and 2.13.0+cpu count as 5.24.0 and 2.13.0
    if _release(low) <= _release(have) <= _release(high):
        return None
    return (f"{package} {have} is outside the tested range {low} .. {high}: results are not known to be right "
            f"(refresh the locks with scripts/lock.sh and rerun CI to extend the range)")


def warnings() -> list[str]:
    found = [untested("transformers", TESTED_TRANSFORMERS), untested("torch", TESTED_TORCH)]
    return [w for w in found if w]


def version_matches(spec: str, package: str = "transformers", have: str | None = None) -> bool:
    """Whether the installed ``package`` satisfies a PEP 440 specifier such as ``>=5.24``
    (an empty spec matches everything)."""
    if not spec:
        return True
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    have = have or installed(package)
    if have is None:
        return False
    return Version(Version(have).base_version) in SpecifierSet(spec)
