"""State-dict schema snapshots (syrupy): key names, shapes and dtypes of the on-disk HF
checkpoint and of the candidate, so a PR that changes either format shows up as a reviewable
diff. Snapshots live beside the arch plugin (``__snapshots__/<arch>/``); refresh them with
``pytest --arch NAME --snapshot-update`` and review the diff.
"""

from pathlib import Path

import pytest
from syrupy.extensions.amber import AmberSnapshotExtension

from moe_conformance.pytest_plugin import CONFORMANCE
from moe_conformance.checks import ANY_DTYPE, conformance


def _schema(state):
    return {k: f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}" for k, v in sorted(state.items())}


@pytest.fixture
def arch_snapshot(arch, snapshot, request):
    folder = request.config.stash[CONFORMANCE].snapshot_dir(arch.spec.name)

    class BesideThePlugin(AmberSnapshotExtension):
        @classmethod
        def dirname(cls, *, test_location) -> str:
            return str(Path(folder))

    return snapshot.use_extension(BesideThePlugin)


@conformance(subject="reference", requires=(), dtypes=ANY_DTYPE)
def test_checkpoint_schema(arch, arch_snapshot, record):
    schema = _schema(arch.disk_state)
    record(figures={"keys": len(schema)})
    assert schema == arch_snapshot


@conformance(dtypes=ANY_DTYPE)
def test_candidate_schema(arch, arch_snapshot, record):
    schema = _schema(arch.candidate().state_dict())
    record(figures={"keys": len(schema)})
    assert schema == arch_snapshot
