"""The expert-parallel family and its launcher.

Launcher (moe_conformance.distributed, tasks in tests/planted_ep.py): ranks run and return in
rank order with torchrun's variables and NVLink multicast off; a hung, exiting or raising rank
fails the launch naming it (a hung rank told from the ones waiting for it in a collective); no
process of the launch outlives the failure, also when the parent's wait is interrupted (the
plugin's check timeout).

Suite (suites/test_expert_parallel.py, one pytest run over every planted plugin of
tests/planted_ep.py): each planted EP bug fails the right check naming the rank and the
tensor; the hang and the crash fail the checks naming the rank, with every process gone; the
unbroken copy passes everything; a plugin that declares no EP gets "not applicable".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_conformance import distributed

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _gone(pids, grace: float = 3.0) -> list[int]:
    """The pids that still exist (running or unreaped) after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        left = [p for p in pids if Path(f"/proc/{p}").exists()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# ---- the launcher


def test_ranks_run_and_return_in_rank_order():
    out = distributed.launch("planted_ep:echo_task", {"value": 21}, 3, prepare="planted_ep:prepare_value", timeout=60)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert {o["sum"] for o in out} == {3.0}  # all-reduce over the 3 ranks
    assert [o["env_rank"] for o in out] == ["0", "1", "2"]
    assert {o["prepared"] for o in out} == {42}  # prepared once in the launcher, before the fork
    assert {o["nvls"] for o in out} == {"0"}


def test_a_hung_rank_is_named_and_every_process_killed():
    handle = distributed.start("planted_ep:sleepy_task", {"who": 1}, 3, timeout=3)
    t0 = time.monotonic()
    with pytest.raises(distributed.LaunchFailed) as failed:
        handle.wait()
    message = str(failed.value)
    assert message.startswith("rank 1 hung: no result 3 s after the ranks started"), message
    assert "planted_ep.py" in message and "in sleepy_task, outside any collective" in message, message
    assert "rank 0 was waiting in torch.distributed all_reduce" in message, message
    assert "rank 2 was waiting in torch.distributed all_reduce" in message, message
    assert failed.value.ranks == [1]
    assert len(failed.value.pids) == 4  # the launcher and 3 ranks
    assert not _gone(failed.value.pids, grace=0.5), "processes of the launch outlived it"
    assert time.monotonic() - t0 < 60


def test_an_exiting_rank_is_named():
    with pytest.raises(distributed.LaunchFailed) as failed:
        distributed.launch("planted_ep:exiting_task", {"who": 2}, 3, timeout=60)
    message = str(failed.value)
    assert message.startswith("rank 2 exited with code 7 without writing its result (stage: about to exit)"), message
    assert failed.value.ranks == [2]
    assert not _gone(failed.value.pids)


def test_a_raising_rank_is_named_with_its_error():
    with pytest.raises(distributed.LaunchFailed) as failed:
        distributed.launch("planted_ep:raising_task", {"who": 1}, 2, timeout=60)
    message = str(failed.value)
    assert message.startswith("rank 1 raised RuntimeError: planted: the expert exchange failed at planted_ep.py:"), message
    assert "in raising_task" in message
    assert not _gone(failed.value.pids)


def test_an_interrupted_wait_leaves_no_process():
    """The plugin's --check-timeout raises inside the wait (SIGALRM): the launch dies with it."""
    class Interrupted(Exception):
        pass

    def on_alarm(signum, frame):
        raise Interrupted()

    handle = distributed.start("planted_ep:sleepy_task", {"who": 0}, 2, timeout=600)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 6.0)
    try:
        with pytest.raises(Interrupted):
            handle.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pids = handle.all_pids()
    assert len(pids) == 3, "the ranks had not started within 6 s"
    assert not _gone(pids)
    assert not handle.folder.exists()


def test_a_spare_launcher_takes_the_next_job(monkeypatch):
    """prestart: a launcher imports ahead and waits; the next start hands it the job. The job's
    environment holds (a variable set after the spare started reaches the ranks)."""
    distributed.prestart([])
    folder, proc = distributed._SPARE
    monkeypatch.setenv("MOE_CONFORMANCE_TEST_LATE", "late")
    handle = distributed.start("planted_ep:env_task", {"name": "MOE_CONFORMANCE_TEST_LATE"}, 2, timeout=60)
    assert handle.proc is proc and handle.folder == folder
    assert handle.wait() == ["late", "late"]
    assert distributed._SPARE is None  # none expected: none started
    assert not _gone([proc.pid]) and not folder.exists()


def test_keep_warm_refills_after_each_launch_and_stop_spare_ends_it():
    distributed.keep_warm(2, [])
    first = distributed._SPARE[1]
    assert distributed.launch("planted_ep:echo_task", {"value": 1}, 2, prepare="planted_ep:prepare_value", timeout=60)
    second = distributed._SPARE[1]  # one more launch expected: the next launcher is already importing
    assert second.pid != first.pid and second.poll() is None
    second.kill()  # a spare that died waiting is replaced by a fresh launcher, not used
    second.wait()
    out = distributed.launch("planted_ep:echo_task", {"value": 1}, 2, prepare="planted_ep:prepare_value", timeout=60)
    assert [o["rank"] for o in out] == [0, 1]
    assert distributed._SPARE is None  # both expected launches done
    distributed.keep_warm(5, [])
    spare = distributed._SPARE
    distributed.stop_spare()
    assert distributed._SPARE is None and not _gone([spare[1].pid]) and not spare[0].exists()
    assert distributed._WARM["left"] == 0


def test_row_splits():
    assert distributed.row_splits(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert distributed.row_splits(23, 2) == [(0, 11), (11, 23)]
    assert distributed.row_splits(23, 4, idle_last=True) == [(0, 7), (7, 15), (15, 23), (23, 23)]


def test_the_machinery_never_imports_the_native_candidate():
    for path in (REPO / "moe_conformance" / "distributed.py", REPO / "suites" / "test_expert_parallel.py"):
        assert not re.search(r"^\s*(from|import)\s+(moe_conformance\.native|\.native)", path.read_text(), re.M), path


# ---- the suite on planted bugs: one pytest run over every planted plugin

# bug -> (the check that must fail, fragments of its message in every world size)
PLANTED = {
    "wrong_expert_offset": ("test_ep_shard_state", [
        "rank 1: layers.1.moe.experts.w1 should hold rows ", "a wrong expert offset on this rank"]),
    "tokens_dropped_at_capacity": ("test_ep_experts_dispatch", [
        "rank 0, 'spread' choices", "layers.1.moe.experts output differs from the single-process experts'",
        "lack exactly the terms of their slots", "tokens silently dropped"]),
    "replicated_grads_not_reduced": ("test_ep_gradients", [
        "rank 0: layers.1.moe.router.gate.weight gradient differs from the single-process gradient",
        "this replicated parameter's gradient is not all-reduced over the group"]),
    "routed_scaling_skipped": ("test_ep_forward", [
        "rank 0 (batch rows 0:", "first divergence at layers.1.moe.router: routing weights differ",
        "divided by routed_scaling_factor 2.827", "the routed scaling is skipped on the expert-parallel path"]),
    "load_not_reduced": ("test_ep_bias_update", [
        "moe.router.expert_bias after the bias update differs from the single-process update",
        "'s own load", "the load counts are not all-reduced over the group before the update"]),
    "aux_statistics_local": ("test_ep_aux_loss", [
        "rank 0: aux-loss share", "rank 1: aux-loss share",
        "the load statistics (tokens per expert) are not all-reduced over the group"]),
    "rank_hangs": ("test_ep_shard_state", [
        "the expert-parallel launch on 4 ranks failed", "rank 1 hung: no result 8 s after the ranks started",
        "in forward, outside any collective", "rank 0 was waiting in torch.distributed all_to_all_single"]),
    "rank_crashes": ("test_ep_shard_state", [
        "the expert-parallel launch on 4 ranks failed",
        "rank 1 exited with code 3 without writing its result (stage: world size 2: shard)"]),
}
# bugs that must fail their check and nothing else
PRECISE = ("replicated_grads_not_reduced", "load_not_reduced", "aux_statistics_local")


@pytest.fixture(scope="module")
def planted_reports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted_ep")
    plugins = []
    for bug in [*PLANTED, "not_declared", "control", "default_locate"]:
        path = folder / f"planted_ep_{bug}.py"
        path.write_text(f"import planted_ep\nARCH = planted_ep.build({bug!r})\n")
        plugins += ["--arch-plugin", str(path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", *plugins, "--family", "expert_parallel",
                           "--report-dir", str(folder / "reports"), "-p", "no:cacheprovider", "-q"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    reports = {}
    for path in (folder / "reports").glob("*.json"):
        report = json.loads(path.read_text())
        reports[report["arch"]] = {c["name"]: c for c in report["checks"]}
    return {"reports": reports, "stdout": proc.stdout, "seconds": time.monotonic() - t0}


def _of(checks: dict, check: str) -> dict:
    return {n: c for n, c in checks.items() if n.startswith(check + "[")}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_ep_bug_fails_its_check(planted_reports, bug):
    check, fragments = PLANTED[bug]
    checks = planted_reports["reports"].get(f"kimi_k25_{bug}")
    assert checks, f"no report for kimi_k25_{bug}:\n{planted_reports['stdout'][-3000:]}"
    hits = _of(checks, check)
    assert sorted(n.rsplit("-", 1)[-1] for n in hits) == ["2ranks]", "4ranks]"], sorted(checks)
    for name, c in hits.items():
        assert c["status"] == "failed", f"{name}: {c['status']} {c['message'][:500]}"
        for fragment in fragments:
            assert fragment in c["message"], f"{bug}: {name} message lacks {fragment!r}:\n{c['message']}"
    if bug in PRECISE:
        others = {n: c["status"] for n, c in checks.items() if not n.startswith(check + "[")}
        assert set(others.values()) == {"passed"}, others


@pytest.mark.parametrize("bug", ["rank_hangs", "rank_crashes"])
def test_a_failed_launch_fails_every_check_and_leaves_no_process(planted_reports, bug):
    checks = planted_reports["reports"][f"kimi_k25_{bug}"]
    assert {c["status"] for c in checks.values()} == {"failed"}, {n: c["status"] for n, c in checks.items()}
    message = next(iter(checks.values()))["message"]
    pids = [int(p) for p in re.search(r"pids ([\d, ]+)\)", message).group(1).split(", ")]
    assert len(pids) == 5, message  # the launcher and 4 ranks
    assert not _gone(pids, grace=0.5), f"processes of the launch still exist: {pids}"
    assert sum(c["seconds"] for c in checks.values()) < 120, "the failure took too long to be seen"


@pytest.mark.parametrize("control", ["control", "default_locate"])
def test_the_unbroken_declaration_passes(planted_reports, control):
    """As declared, and with ExpertParallel.locate left to the default rule."""
    checks = planted_reports["reports"][f"kimi_k25_{control}"]
    assert len(checks) == 12 and {c["status"] for c in checks.values()} == {"passed"}, \
        {n: (c["status"], c["message"][:300]) for n, c in checks.items()}


def test_undeclared_expert_parallelism_is_not_applicable(planted_reports):
    undeclared = planted_reports["reports"]["kimi_k25_not_declared"]
    assert len(undeclared) == 12 and {c["status"] for c in undeclared.values()} == {"not_applicable"}
    assert all("declare ArchSpec(expert_parallel=ExpertParallel(shard=" in c["message"] for c in undeclared.values())
