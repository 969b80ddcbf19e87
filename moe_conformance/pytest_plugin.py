"""The pytest plugin: ``pytest --arch kimi_k25``.

Registered through the ``pytest11`` entry point, so merely installing moe-conformance makes the
options available. Importing this module imports neither torch nor any arch: the plugin stays
dormant until ``--arch`` or ``--arch-plugin`` is given. Then it

- points collection at the conformance suites (unless test paths were given explicitly),
- parametrizes every test that takes the ``arch`` fixture over the selected (arch, variant)
  cases, with ids ``test_name[arch-variant]``,
- marks expected failures declared by the arch spec (strict xfail, with their reason),
- collects each check's figures and thresholds from the test reports (pytest-xdist forwards
  them to the controller), and has the controller alone write ``<report-dir>/<arch>.json/.md``.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import registry, report, support
from .paths import suites_dir
from .spec import describe

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe-conformance", "MoE conformance suite")
    group.addoption("--arch", default=None, help="architecture(s) to check: a name, 'a,b', or 'all'")
    group.addoption(
        "--arch-plugin", action="append", default=[], metavar="PATH_OR_MODULE",
        help="an arch plugin outside this package: a .py file or an importable module (repeatable)",
    )
    group.addoption("--device", default="cpu", help="torch device for the checks: cpu (default) or cuda")
    group.addoption("--report-dir", default="reports", help="where <arch>.json and <arch>.md go (default: reports/)")
    group.addoption("--seed", type=int, default=0, help="base seed for tiny models and inputs (default: 0)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "arch_variants(*names): run this check on these variants only")
    if not (config.getoption("arch") or config.getoption("arch_plugin")):
        return
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if not config.getoption("device").startswith("cuda"):
        # Triton kernels run on CPU only under the interpreter, which must be chosen before the
        # first `import triton` of the process (collection imports transformers, which may).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    known, plugin_names = registry.discover(config.getoption("arch_plugin"))
    try:
        selected = registry.select(known, config.getoption("arch"), plugin_names)
    except registry.UnknownArch as exc:
        raise pytest.UsageError(str(exc)) from None
    device = config.getoption("device")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {device} was asked for but torch.cuda.is_available() is False")
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args = [str(suites_dir())]
    # Schema snapshots are per arch and variant: running a subset (-k, one arch) must not fail
    # on the snapshots it did not use.
    config.option.warn_unused_snapshots = True
    conformance = Conformance(config, selected)
    config.stash[CONFORMANCE] = conformance
    config.pluginmanager.register(conformance, "moe-conformance-session")


@dataclass(frozen=True)
class CaseRef:
    """The parameter behind the ``arch`` fixture: picklable, cheap, printed in ids."""

    arch: str
    variant: str | None  # None: the plugin failed to load


CONFORMANCE = pytest.StashKey["Conformance"]()


class Conformance:
    def __init__(self, config: pytest.Config, selected: list[registry.ArchEntry]):
        self.config = config
        self.entries = {e.name: e for e in selected}
        self.device = config.getoption("device")
        self.seed = config.getoption("seed")
        self.report_dir = Path(config.getoption("report_dir"))
        if not self.report_dir.is_absolute():
            self.report_dir = config.invocation_params.dir / self.report_dir
        self.results: dict[str, dict[str, Any]] = {}  # nodeid -> check record
        self.started = time.time()
        self._cases: dict[tuple[str, str], Any] = {}
        self.is_worker = hasattr(config, "workerinput")

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
            f"triton {versions['triton']}; device {self.device}; seed {self.seed}; reports -> {self.report_dir}"
        ]
        lines += [f"moe-conformance WARNING: {w}" for w in support.warnings()]
        for name, entry in self.entries.items():
            spec = self._spec(name)
            if spec is None:
                lines.append(f"  arch {name} ({entry.origin}): PLUGIN FAILED TO LOAD (see the errored case)")
            else:
                lines.append(
                    f"  arch {name} ({entry.origin}): reference {describe(spec.reference)}, "
                    f"candidate {describe(spec.candidate)}, variants {', '.join(v.name for v in spec.variants)}"
                )
        return lines

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "arch" not in metafunc.fixturenames:
            return
        marker = metafunc.definition.get_closest_marker("arch_variants")
        only = set(marker.args) if marker else None
        params = []
        for name in self.entries:
            spec = self._spec(name)
            if spec is None:
                params.append(pytest.param(CaseRef(name, None), id=f"{name}-plugin_error"))
                continue
            for v in spec.variants:
                if only is None or v.name in only:
                    params.append(pytest.param(CaseRef(name, v.name), id=f"{name}-{v.name}"))
        metafunc.parametrize("arch", params, indirect=True)

    def pytest_collection_modifyitems(self, items):
        for item in items:
            ref = _case_ref(item)
            if ref is None or ref.variant is None:
                continue
            spec = self._spec(ref.arch)
            xf = spec.expected_failure(item.originalname, family_of(item), ref.variant, item.name)
            if xf is not None:
                item.add_marker(pytest.mark.xfail(reason=xf.reason, strict=True))

    def snapshot_dir(self, arch: str) -> Path:
        return self.entries[arch].snapshot_dir

    def case(self, ref: CaseRef):
        """The per-process ArchCase cache (built lazily, deterministic in any process)."""
        key = (ref.arch, ref.variant)
        if key not in self._cases:
            import torch

            from .case import ArchCase

            torch.set_num_threads(1)  # same reductions serially and under xdist: same figures
            self._cases[key] = ArchCase(self._spec(ref.arch), ref.variant, seed=self.seed, device=self.device)
        return self._cases[key]

    # ---- results (controller side: xdist forwards every worker's reports here)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        if "moe_case" not in props:
            return
        record = self.results.setdefault(report.nodeid, {**props["moe_case"], "status": None, "message": "",
                                                        "figures": {}, "thresholds": {}, "seconds": 0.0})
        check = props.get("moe_check")
        if check:
            record["figures"].update(check["figures"])
            record["thresholds"].update(check["thresholds"])
        record["seconds"] = round(record["seconds"] + report.duration, 4)
        status, message = _status(report)
        if status and (record["status"] in (None, "passed") or report.when == "call"):
            record["status"], record["message"] = status, message or record["message"]

    def pytest_terminal_summary(self, terminalreporter):
        if not self.results:
            return
        terminalreporter.section("moe-conformance")
        for arch, checks in sorted(self._by_arch().items()):
            for family, counts in report.family_counts(checks).items():
                text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                terminalreporter.write_line(f"{arch:<16} {family:<14} {text}")
        for path in getattr(self, "written", []):
            terminalreporter.write_line(f"report: {path}")

    def _by_arch(self):
        grouped = defaultdict(list)
        for nodeid, rec in self.results.items():
            grouped[rec["arch"]].append({k: v for k, v in rec.items() if k != "arch"})
        return grouped

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if self.is_worker or not self.results:
            return
        self.written = []
        env = report.environment(self.device, self.seed)
        for arch, checks in self._by_arch().items():
            spec = self._spec(arch)
            header = {
                "environment": env,
                "plugin": self.entries[arch].origin,
                "reference": describe(spec.reference) if spec else None,
                "candidate": describe(spec.candidate) if spec else None,
                "config": _configs(spec) if spec else {},
                "seconds": round(time.time() - self.started, 2),
            }
            self.written += report.write(self.report_dir, report.build(arch, header, checks))


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


def family_of(item) -> str:
    module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
    return module.removeprefix("test_")


def _status(rep: pytest.TestReport) -> tuple[str | None, str]:
    xfail = getattr(rep, "wasxfail", None)
    if rep.when in ("setup", "teardown"):
        if rep.failed:
            return "error", _message(rep)
        if rep.skipped:
            return ("xfailed", xfail) if xfail is not None else ("skipped", _message(rep))
        return ("passed" if rep.when == "setup" else None), ""
    if xfail is not None:
        return ("xfailed", xfail) if rep.skipped else ("failed", f"unexpectedly passed (strict xfail: {xfail})")
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
    """The (arch, variant) under test: an ``ArchCase`` with its config, weights and models."""
    ref: CaseRef = request.param
    conformance = request.config.stash[CONFORMANCE]
    request.node.user_properties.append(
        ("moe_case", {"arch": ref.arch, "variant": ref.variant, "family": family_of(request.node),
                      "name": request.node.name})
    )
    if ref.variant is None:
        pytest.fail(conformance.entries[ref.arch].error, pytrace=False)
    return conformance.case(ref)


class CheckRecord:
    """What a check measured: figures and the thresholds they were held to, for the report."""

    def __init__(self):
        self.figures: dict[str, Any] = {}
        self.thresholds: dict[str, Any] = {}

    def __call__(self, figures: dict[str, Any] = None, thresholds: dict[str, Any] = None) -> None:
        self.figures.update(figures or {})
        self.thresholds.update(thresholds or {})


@pytest.fixture
def record(request):
    rec = CheckRecord()
    # The same dict objects travel in the report, so figures recorded during the call count.
    request.node.user_properties.append(("moe_check", {"figures": rec.figures, "thresholds": rec.thresholds}))
    return rec
