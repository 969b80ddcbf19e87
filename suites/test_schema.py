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


def _recorded(arch, request) -> None:
    """A case with no recorded snapshot fails saying how to record one (syrupy's own message
    only says it does not exist)."""
    if request.config.getoption("--snapshot-update", default=False):
        return
    folder = Path(request.config.stash[CONFORMANCE].snapshot_dir(arch.spec.name))
    file = folder / "test_schema.ambr"
    if f"# name: {request.node.name}\n" not in (file.read_text() if file.exists() else ""):
        arch.fail("no schema snapshot is recorded for this case",
                  [f"record it once with `pytest --arch {arch.spec.name} --family schema --snapshot-update` (for a plugin "
                   f"file: `--arch-plugin PATH`), review {file} and commit it beside the plugin"])


@conformance(subject="reference", requires=(), dtypes=ANY_DTYPE)
def test_checkpoint_schema(arch, arch_snapshot, record, request):
    schema = _schema(arch.disk_state)
    record(figures={"keys": len(schema)})
    _recorded(arch, request)
    assert schema == arch_snapshot


@conformance(dtypes=ANY_DTYPE)
def test_candidate_schema(arch, arch_snapshot, record, request):
    schema = _schema(arch.candidate().state_dict())
    record(figures={"keys": len(schema)})
    _recorded(arch, request)
    assert schema == arch_snapshot
