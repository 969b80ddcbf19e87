"""The pytest plugin: ``pytest --arch kimi_k25``.

Registered through the ``pytest11`` entry point, so merely installing moe-conformance makes the
options available. Importing this module imports neither torch nor any arch: the plugin stays
dormant until ``--arch`` or ``--arch-plugin`` is given. Then it

- points collection at the conformance suites (or the ``--family`` ones), the contract first,
- parametrizes every test that takes the ``arch`` fixture over the selected (arch, variant)
  cases, with ids ``test_name[arch-variant]``,
- marks expected failures declared by the arch spec (strict xfail, with their reason),
- before each check, reports it "not applicable" (with what to declare) or "blocked by
  contract" (with the root cause) instead of running it into misleading numbers,
- holds every check to a timeout, and turns SIGTERM into an interruption,
- collects each check's status from pytest's own outcome (a check is passed only when its
  body returned), figures and thresholds (pytest-xdist forwards them to the controller), and
  has the controller alone write ``<report-dir>/<arch>.json/.md``: a complete run replaces the
  report, a filtered or interrupted one writes ``<arch>.partial.json/.md`` beside it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from . import registry, report, support
from .paths import suites_dir
from .spec import describe

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
DEFAULT_TIMEOUT = 300.0  # seconds per check phase; the slowest (RL with vLLM engine starts) take ~100 s on 2 cores
# Order of the families in a run: the contract first (everything else may be blocked by it).
FAMILY_ORDER = ("contract", "tiny_config", "logit_parity", "roundtrip", "schema")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe-conformance", "MoE conformance suite")
    group.addoption("--arch", default=None, help="architecture(s) to check: a name, 'a,b', or 'all'")
    group.addoption(
        "--arch-plugin", action="append", default=[], metavar="PATH_OR_MODULE",
        help="an arch plugin outside this package: a .py file or an importable module (repeatable)",
    )
    group.addoption("--family", default=None, metavar="NAMES",
                    help="run only these check families, e.g. 'contract,logit_parity' (default: all)")
    group.addoption("--device", default="cpu", help="torch device for the checks: cpu (default) or cuda")
    group.addoption("--kernels", default=None, metavar="NAMES",
                    help="kernels the kernels family checks besides those a plugin declares: bundled 'triton', 'torch', "
                         "or a team's 'module:ATTRIBUTE' (comma-separated)")
    group.addoption("--dtype", default="float32", choices=("float32", "bfloat16", "bf16"),
                    help="precision of the models under test: float32 (semantic parity, default) or bf16 (the "
                         "production profile: bf16 weights, gates from a bf16 noise floor)")
    group.addoption("--report-dir", default="reports", help="where <arch>.json and <arch>.md go (default: reports/)")
    group.addoption("--seed", type=int, default=0, help="base seed for tiny models and inputs (default: 0)")
    group.addoption("--check-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help=f"fail a check whose setup, body or teardown runs longer (default {DEFAULT_TIMEOUT:g}; 0: none)")
    group.addoption("--allow-hub", action="store_true", default=False,
                    help="do not force the Hugging Face hub offline (the suite never needs it)")


@pytest.hookimpl(tryfirst=True, specname="pytest_configure")
def pytest_configure_hypothesis_profiles(config: pytest.Config) -> None:
    """Register the kernel check set's hypothesis profiles before hypothesis' own plugin loads the
    one `--hypothesis-profile` names (importing hypothesis costs 0.5 s: only when asked)."""
    if str(config.getoption("--hypothesis-profile", default=None) or "").startswith("moe-conformance"):
        from .kernel_checks import profiles  # noqa: F401 - registers them


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """Choose the Triton mode before any conftest runs: a conftest may import transformers, which
    imports triton, and the interpreter is read once, at that first import. On CPU the Triton
    kernels run only under the interpreter; on a GPU they must compile (an interpreter switched on
    by a CPU default failed every Triton kernel check on an H200)."""
    known = early_config.known_args_namespace
    if not (getattr(known, "arch", None) or getattr(known, "arch_plugin", None)):
        return  # not a conformance run: leave the user's Triton alone
    os.environ.setdefault("TRITON_INTERPRET", "0" if str(known.device).startswith("cuda") else "1")


def _active(config: pytest.Config) -> bool:
    return bool(config.getoption("arch") or config.getoption("arch_plugin"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "arch_variants(*names): run this check on these variants only")
    if not _active(config):
        return
    if not config.getoption("allow_hub"):
        os.environ.update(OFFLINE_ENV)  # overrides a user's HF_HUB_OFFLINE=0: the suite never downloads
    try:
        known, plugin_names = registry.discover(config.getoption("arch_plugin"))
        selected = registry.select(known, config.getoption("arch"), plugin_names)
    except (registry.UnknownArch, registry.PluginArgumentError, registry.DuplicateArch) as exc:
        raise pytest.UsageError(str(exc)) from None
    device = config.getoption("device")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {device} was asked for but torch.cuda.is_available() is False")
    conformance = Conformance(config, selected)
    conformance.check_report_dir()
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args = conformance.suite_paths()
    # Schema snapshots are per arch and variant: running a subset (-k, one arch) must not fail
    # on the snapshots it did not use.
    config.option.warn_unused_snapshots = True
    config.stash[CONFORMANCE] = conformance
    config.pluginmanager.register(conformance, "moe-conformance-session")
    conformance.install_signal_handlers()


@dataclass(frozen=True)
class CaseRef:
    """The parameter behind the ``arch`` fixture: picklable, cheap, printed in ids."""

    arch: str
    variant: str | None  # None: the plugin failed to load


CONFORMANCE = pytest.StashKey["Conformance"]()


class CheckTimeout(Exception):
    pass


class Conformance:
    def __init__(self, config: pytest.Config, selected: list[registry.ArchEntry]):
        self.config = config
        self.entries = {e.name: e for e in selected}
        self.device = config.getoption("device")
        self.seed = config.getoption("seed")
        self.timeout = config.getoption("check_timeout")
        self.kernels = [k.strip() for k in (config.getoption("kernels") or "").split(",") if k.strip()]
        self.dtype = {"bf16": "bfloat16"}.get(config.getoption("dtype"), config.getoption("dtype"))
        self.families = _families(config.getoption("family"))
        self.report_dir = Path(config.getoption("report_dir"))
        if not self.report_dir.is_absolute():
            self.report_dir = config.invocation_params.dir / self.report_dir
        self.results: dict[str, dict[str, Any]] = {}  # nodeid -> check record
        self.totals: dict[str, Counter] = defaultdict(Counter)  # arch -> pytest's own outcome categories
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        self.started = time.time()
        self.deselected = 0
        self.interrupted_by: str | None = None
        self._cases: dict[tuple[str, str], Any] = {}
        self.is_worker = hasattr(config, "workerinput")

    # ---- set-up
    def check_report_dir(self) -> None:
        if self.is_worker:
            return
        try:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            probe = self.report_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise pytest.UsageError(f"--report-dir {self.report_dir} is not writable ({exc.strerror or exc}): "
                                    f"no report could be written; choose another --report-dir") from None

    def suite_paths(self) -> list[str]:
        root = suites_dir()
        if not self.families:
            return [str(root)]
        known = sorted(p.stem.removeprefix("test_") for p in root.glob("test_*.py"))
        unknown = [f for f in self.families if f not in known]
        if unknown:
            raise pytest.UsageError(f"unknown --family {', '.join(unknown)}; known families: {', '.join(known)}")
        return [str(root / f"test_{f}.py") for f in self.families]

    def install_signal_handlers(self) -> None:
        """SIGTERM becomes an interruption (reports are written, marked interrupted)."""
        def on_term(signum, frame):
            self.interrupted_by = "SIGTERM"
            raise KeyboardInterrupt("SIGTERM")

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (an embedding runner): leave signals alone
            pass

    # ---- collection
    def _spec(self, name):
        try:
            return self.entries[name].load()
        except registry.PluginLoadError:
            return None

    def pytest_report_header(self, config):
        versions = report.package_versions()
        lines = [
            f"moe-conformance: torch {versions['torch']}, transformers {versions['transformers']}, "
            f"triton {versions['triton']}; device {self.device}; dtype {self.dtype}; seed {self.seed}; "
            f"reports -> {self.report_dir}; check timeout {self.timeout:g} s"
            + (f"; kernels {', '.join(self.kernels)}" if self.kernels else "")
            + ("; TRITON_INTERPRET=1" if os.environ.get("TRITON_INTERPRET") == "1" else "")
        ]
        lines += [f"moe-conformance WARNING: {w}" for w in support.warnings()]
        for name, entry in self.entries.items():
            spec = self._spec(name)
            if spec is None:
                lines.append(f"  arch {name} ({entry.origin}): PLUGIN FAILED TO LOAD (see the errored case)")
                continue
            lines.append(
                f"  arch {name} ({entry.origin}): reference {describe(spec.reference)}, "
                f"candidate {describe(spec.candidate)}, variants {', '.join(v.name for v in spec.variants)}"
            )
            lines += [f"    LOOSENED GATE: {line}" for line in report.loosened_gates(spec)]
        return lines

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "arch" not in metafunc.fixturenames:
            return
        marker = metafunc.definition.get_closest_marker("arch_variants")
        only = set(marker.args) if marker else None
        family = metafunc.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
        params = []
        for name in self.entries:
            spec = self._spec(name)
            if spec is None:
                params.append(pytest.param(CaseRef(name, None), id=f"{name}-plugin_error"))
                continue
            for v in spec.variants:
                # a variant runs the families it declares (an engine variant: the engine checks):
                # its cases are not generated for the others, so a full run stays complete
                if (only is None or v.name in only) and v.runs(family):
                    params.append(pytest.param(CaseRef(name, v.name), id=f"{name}-{v.name}"))
        metafunc.parametrize("arch", params, indirect=True)

    def pytest_collection_modifyitems(self, items):
        for item in items:
            ref = _case_ref(item)
            if ref is None or ref.variant is None:
                continue
            spec = self._spec(ref.arch)
            xf = spec.expected_failure(item.originalname, family_of(item), ref.variant, item.name, self.dtype, self.device)
            if xf is not None:
                item.add_marker(pytest.mark.xfail(reason=xf.reason, strict=xf.strict_in(self.dtype)))
        rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
        items.sort(key=lambda it: rank.get(family_of(it), len(rank)))  # stable: file order within a family

    def pytest_deselected(self, items):
        self.deselected += len(items)

    def pytest_collection_finish(self, session):
        """Start the expert-parallel launcher ahead (distributed.keep_warm): its imports then
        overlap the families before it. One per process that runs checks; CPU (gloo) only."""
        if self.config.getoption("collectonly") or self.device != "cpu":
            return
        ep_cases = set()
        for item in session.items:  # (an xdist controller collects none)
            ref = _case_ref(item)
            if (ref is not None and ref.variant is not None and family_of(item) == "expert_parallel"
                    and getattr(self._spec(ref.arch), "expert_parallel", None) is not None):
                ep_cases.add((ref.arch, ref.variant))
        if ep_cases:
            from . import distributed

            sources = []
            for arch in sorted({a for a, _ in ep_cases}):
                try:
                    sources.append(distributed.plugin_source(self._spec(arch)))
                except LookupError:  # the launch says so, naming the arch
                    pass
            distributed.keep_warm(len(ep_cases), sources)

    def snapshot_dir(self, arch: str) -> Path:
        return self.entries[arch].snapshot_dir

    def case(self, ref: CaseRef):
        """The per-process ArchCase cache (built lazily, deterministic in any process)."""
        key = (ref.arch, ref.variant)
        if key not in self._cases:
            import torch

            from .case import ArchCase

            torch.set_num_threads(1)  # same reductions serially and under xdist: same figures
            self._cases[key] = ArchCase(self._spec(ref.arch), ref.variant, seed=self.seed, device=self.device,
                                        kernels=self.kernels, dtype=self.dtype)
        return self._cases[key]

    # ---- timeouts: every phase of a check, on the process that runs it
    def _timed(self, item, phase):
        if not self.timeout or not hasattr(signal, "SIGALRM"):
            return None

        def on_alarm(signum, frame):
            raise pytest.fail.Exception(_timeout_message(item, phase, self.timeout, frame), pytrace=False)

        try:
            previous = signal.signal(signal.SIGALRM, on_alarm)
        except ValueError:
            return None
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        return previous

    @staticmethod
    def _untimed(previous):
        if previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        previous = self._timed(item, "setup")
        try:
            return (yield)
        finally:
            self._untimed(previous)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        previous = self._timed(item, "body")
        try:
            return (yield)
        finally:
            self._untimed(previous)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item, nextitem):
        previous = self._timed(item, "teardown")
        try:
            return (yield)
        finally:
            self._untimed(previous)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        """A failing check of a case whose candidate fails logit parity carries that case's root
        cause, so the summary groups knock-on failures under the first divergence."""
        rep = yield
        ref = _case_ref(item)
        timed_out = call.excinfo is not None and "--check-timeout" in str(call.excinfo.value)
        if (rep.when == "call" and rep.failed and ref is not None and ref.variant is not None and not timed_out
                and family_of(item) not in ("contract", "tiny_config")
                and not any(k == "moe_root_cause" for k, _ in rep.user_properties)):
            previous = self._timed(item, "failure diagnosis")  # it runs the candidate again: held to the timeout too
            try:
                cause = self.case(ref).parity_root_cause()
            except pytest.fail.Exception:
                cause = None
            finally:
                self._untimed(previous)
            if cause:
                rep.user_properties.append(("moe_root_cause", cause))
        # figures travel as JSON text: xdist's wire format holds no integer beyond 32 bits (a
        # full-size parameter count), and the report is JSON anyway
        rep.user_properties = [(k, json.dumps(v, default=str) if k == "moe_check" else v) for k, v in rep.user_properties]
        return rep

    # ---- results (controller side: xdist forwards every worker's reports here)
    def _crashed_record(self, report) -> dict | None:
        """pytest-xdist reports a check whose worker died under a nodeid of its own (``::name``,
        without the file) and without the check's properties: find the check it was."""
        if not report.failed:
            return None
        tail = report.nodeid.rsplit("::", 1)[-1]
        for nodeid, record in self.results.items():
            if nodeid == report.nodeid or (report.nodeid.startswith("::") and nodeid.endswith("::" + tail)):
                return record
        return None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        if "moe_case" not in props:
            record = self._crashed_record(report)
            if record is not None:
                category = self.config.hook.pytest_report_teststatus(report=report, config=self.config)[0]
                self.totals[record["arch"]][category or "failed"] += 1
                record["status"], record["message"] = "failed", _message(report)
            return
        case = props["moe_case"]
        category = self.config.hook.pytest_report_teststatus(report=report, config=self.config)[0]
        if category:
            self.totals[case["arch"]][category] += 1
        record = self.results.setdefault(report.nodeid, {**case, "status": None, "kind": None, "message": "",
                                                         "figures": {}, "thresholds": {}, "seconds": 0.0})
        check = props.get("moe_check")
        if isinstance(check, str):
            check = json.loads(check)
        if check:
            record["figures"].update(check["figures"])
            record["thresholds"].update(check["thresholds"])
            record.setdefault("noise", {}).update(check.get("noise", {}))
        if props.get("moe_kind"):
            record["kind"] = props["moe_kind"]
        if props.get("moe_root_cause"):
            record["root_cause"] = props["moe_root_cause"]
        record["seconds"] = round(record["seconds"] + report.duration, 4)
        status, message = _status(report, record.get("kind"))
        if status is None:
            return
        # the worst phase wins: a passing body with a failing teardown is an error
        if record["status"] is None or _SEVERITY[status] > _SEVERITY.get(record["status"], 0):
            record["status"], record["message"] = status, message or record["message"]

    def pytest_keyboard_interrupt(self, excinfo):
        self.interrupted_by = self.interrupted_by or "SIGINT"

    def _finish_records(self, interrupted: bool) -> None:
        """A check that never reported its body (a crashed worker, an interrupt) is not a pass."""
        for record in self.results.values():
            if record["status"] is None:
                record["status"] = "interrupted" if interrupted else "error"
                record["message"] = ("interrupted before the check finished" if interrupted else
                                     "the check started but never finished (its process died or was stopped)")

    def pytest_terminal_summary(self, terminalreporter):
        if not self.results:
            return
        terminalreporter.section("moe-conformance")
        for arch, checks in sorted(self._by_arch().items()):
            for family, counts in report.family_counts(checks).items():
                text = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items()))
                terminalreporter.write_line(f"{arch:<16} {family:<14} {text}")
        for line in report.root_causes(list(self.results.values())):
            terminalreporter.write_line(line)
        for path in getattr(self, "written", []):
            terminalreporter.write_line(f"report: {path}")

    def _by_arch(self):
        grouped = defaultdict(list)
        for nodeid, rec in self.results.items():
            grouped[rec["arch"]].append({k: v for k, v in rec.items() if k != "arch"})
        return grouped

    def _run_record(self, session, exitstatus) -> dict[str, Any]:
        opt = self.config.option
        interrupted = bool(self.interrupted_by) or int(exitstatus) == int(pytest.ExitCode.INTERRUPTED)
        explicit = self.config.args_source == pytest.Config.ArgsSource.ARGS and self.config.args != [str(suites_dir())]
        filtered = bool(getattr(opt, "keyword", "") or getattr(opt, "markexpr", "") or self.deselected
                        or self.families or explicit or session.shouldstop or session.shouldfail)
        return {
            "id": self.run_id,
            "status": "interrupted" if interrupted else ("partial" if filtered else "complete"),
            "interrupted_by": self.interrupted_by if interrupted else None,
            "exit_code": int(exitstatus),
            "selection": {"archs": sorted(self.entries), "keyword": getattr(opt, "keyword", "") or None,
                          "markexpr": getattr(opt, "markexpr", "") or None, "families": self.families or None,
                          "paths": [str(a) for a in self.config.args] if explicit else None,
                          "deselected": self.deselected, "stopped_early": bool(session.shouldstop or session.shouldfail)},
            "argv": list(self.config.invocation_params.args),
            "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
            "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - self.started, 2),
        }

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        from . import distributed

        distributed.stop_spare()
        if self.is_worker or not self.results:
            return
        run = self._run_record(session, exitstatus)
        self._finish_records(run["status"] == "interrupted")
        self.written = []
        built, images = [], {}
        partial = run["status"] != "complete"
        env = report.environment(self.device, self.seed)
        for arch, checks in self._by_arch().items():
            spec = self._spec(arch)
            header = {
                "run": run,
                "environment": env,
                "plugin": self.entries[arch].origin,
                "reference": describe(spec.reference) if spec else None,
                "candidate": describe(spec.candidate) if spec else None,
                "config": _configs(spec) if spec else {},
                "loosened_gates": report.loosened_gates(spec) if spec else [],
                "pytest_totals": dict(self.totals[arch]),
                "seconds": run["seconds"],
            }
            built.append(report.build(arch, header, checks))
            try:
                paths, plots = report.write(self.report_dir, built[-1], partial=partial)
                self.written += paths
                images.update(plots)
            except OSError as exc:  # the directory was checked at start; say what was lost, do not crash
                sys.stderr.write(f"moe-conformance: could not write the {arch} report to {self.report_dir}: {exc}\n")
        try:
            from . import html_report

            self.written.append(html_report.write(self.report_dir, built, images,
                                                  name="index.partial.html" if partial else "index.html"))
        except Exception as exc:  # noqa: BLE001 - the JSON and Markdown reports are written; say what failed
            sys.stderr.write(f"moe-conformance: the HTML report could not be written: {type(exc).__name__}: {exc}\n")


_SEVERITY = {"passed": 1, "xfailed": 1, "xpassed": 1, "skipped": 1, "not_applicable": 1, "blocked": 1, "failed": 3, "error": 3,
             "interrupted": 2}


def _timeout_message(item, phase: str, timeout: float, frame) -> str:
    """Name the check, the phase and where it was: the innermost frame, and the suite's line."""
    inner = frame
    suite_frame = None
    suites = str(suites_dir())
    f = frame
    while f is not None:
        if f.f_code.co_filename.startswith(suites) and suite_frame is None:
            suite_frame = f
        f = f.f_back
    where = f"{Path(inner.f_code.co_filename).name}:{inner.f_lineno} in {inner.f_code.co_name}"
    called = (f", from {Path(suite_frame.f_code.co_filename).name}:{suite_frame.f_lineno} in {suite_frame.f_code.co_name}"
              if suite_frame is not None and suite_frame is not inner else "")
    return (f"{item.nodeid.rsplit('::', 1)[-1]}: the check's {phase} ran past its {timeout:g} s timeout "
            f"(--check-timeout); it was running {where}{called}")


def _families(option: str | None) -> list[str]:
    return [f.strip() for f in option.split(",") if f.strip()] if option else []


def _configs(spec) -> dict[str, Any]:
    out = {}
    for v in spec.variants:
        try:
            out[v.name] = v.config().to_dict()
        except Exception as exc:  # noqa: BLE001 - the report still gets written
            out[v.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _case_ref(item) -> CaseRef | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("arch") if callspec else None


_PLUGIN_ERRORS_SHOWN: set[str] = set()


def family_of(item) -> str:
    module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
    return module.removeprefix("test_")


def _status(rep: pytest.TestReport, kind: str | None) -> tuple[str | None, str]:
    """The record's status from pytest's outcome of one phase; None while nothing is known
    (a passing setup says nothing about the check)."""
    xfail = getattr(rep, "wasxfail", None)
    if rep.when in ("setup", "teardown"):
        if rep.failed:
            return "error", _message(rep)
        if rep.skipped:
            if xfail is not None:
                return "xfailed", xfail
            return (kind or "skipped"), _message(rep)
        return None, ""
    if xfail is not None:
        if rep.skipped:
            return "xfailed", xfail
        if rep.passed:  # a non-strict expected failure that did not happen
            return "xpassed", f"passed although expected to fail (non-strict: {xfail})"
        return "failed", f"unexpectedly passed (strict xfail: {xfail})"
    if rep.passed:
        return "passed", ""
    return ("skipped" if rep.skipped else "failed"), _message(rep)


def _message(rep: pytest.TestReport) -> str:
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple):  # skip: (path, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    return str(longrepr)[-4000:] if longrepr else ""


# ---- fixtures


@pytest.fixture
def arch(request):
    """The (arch, variant) under test: an ``ArchCase`` with its config, weights and models.
    Before the check runs: not applicable or blocked by the contract, per its declaration."""
    from .checks import applicability, info_of

    ref: CaseRef = request.param
    conformance = request.config.stash[CONFORMANCE]
    info = info_of(getattr(request.node, "function", None))
    request.node.user_properties.append(
        ("moe_case", {"arch": ref.arch, "variant": ref.variant, "family": family_of(request.node),
                      "name": request.node.name, "check": request.node.originalname, "subject": info.subject})
    )
    if ref.variant is None:
        error = conformance.entries[ref.arch].error
        if ref.arch in _PLUGIN_ERRORS_SHOWN:  # the traceback once per process, then its first line
            error = error.splitlines()[0] + " (traceback on this arch's first check)"
        _PLUGIN_ERRORS_SHOWN.add(ref.arch)
        pytest.fail(error, pytrace=False)
    case = conformance.case(ref)
    params = {k: v for k, v in getattr(getattr(request.node, "callspec", None), "params", {}).items() if k != "arch"}
    why = applicability(info, case, params)
    if why:
        request.node.user_properties.append(("moe_kind", "not_applicable"))
        pytest.skip(f"not applicable: {why}")
    broken = case.contract.first_problem(info.requires) if info.requires else None
    if broken:
        item, message = broken
        request.node.user_properties.append(("moe_kind", "blocked"))
        request.node.user_properties.append(("moe_root_cause", f"{case.id}: contract ({item}): {message}"))
        pytest.skip(f"blocked by contract ({item}): {message}")
    return case


class CheckRecord:
    """What a check measured: figures and the thresholds they were held to, for the report."""

    def __init__(self):
        self.figures: dict[str, Any] = {}
        self.thresholds: dict[str, Any] = {}
        self.noise: dict[str, Any] = {}

    def __call__(self, figures: dict[str, Any] = None, thresholds: dict[str, Any] = None,
                 noise: dict[str, Any] = None) -> None:
        self.figures.update(figures or {})
        self.thresholds.update(thresholds or {})
        self.noise.update(noise or {})


@pytest.fixture
def record(request):
    rec = CheckRecord()
    # The same dict objects travel in the report, so figures recorded during the call count.
    request.node.user_properties.append(("moe_check", {"figures": rec.figures, "thresholds": rec.thresholds,
                                                       "noise": rec.noise}))
    return rec
