"""The kernel check set's hypothesis profiles. They are registered on import: by strategies.py, and
by the pytest plugin when hypothesis' own ``--hypothesis-profile NAME`` names one of them, before
hypothesis loads it.

- ``moe-conformance-ci`` (what every run uses): deterministic, few examples, no deadline (the
  Triton interpreter is slow and its speed varies), no example database.
- ``moe-conformance-sweep``: the same, with 25 drawn cases per (op, kernel, dtype) and every
  variant swept in every dtype; for a longer run in CI (``--hypothesis-profile
  moe-conformance-sweep``), not for each PR's check.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

CI_PROFILE = "moe-conformance-ci"
SWEEP_PROFILE = "moe-conformance-sweep"

CI_SETTINGS = settings(
    derandomize=True,
    max_examples=3,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
SWEEP_SETTINGS = settings(CI_SETTINGS, max_examples=25)
settings.register_profile(CI_PROFILE, CI_SETTINGS)
settings.register_profile(SWEEP_PROFILE, SWEEP_SETTINGS)


def sweep_examples() -> int | None:
    """Drawn cases per (op, kernel, dtype) when the sweep profile is loaded; else None."""
    if settings.get_current_profile_name() != SWEEP_PROFILE:
        return None
    return settings.default.max_examples
