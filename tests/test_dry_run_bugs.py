"""The dry_run family: released configs, counts, layouts, and planted bugs that only show at
full size (a uint8 expert index wraps past 255: Kimi K2.5 has 384 experts, DeepSeek-V3 256; a
candidate capping first_k_dense_replace at 1, which the tiny configs use anyway).

The planted specs are built by this module's ``build(bug, arch)``; the suites load it through a
plugin file under another module name, since the suite module is ``test_dry_run`` too."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import checks_by_name, run_suites
from transformers import (
    DeepseekV3Config,
    Glm4MoeConfig,
    GptOssConfig,
    Kimi_K25Config,
    MiniMaxM2Config,
    MixtralConfig,
    Qwen3MoeConfig,
)

from moe_conformance.dryrun import (
    FILE_METADATA_KEYS,
    Layout,
    ParamCounts,
    TensorSpec,
    known_releases,
    parse_layouts,
    read_released,
    released_config,
    schema_problems,
)
from moe_conformance.paths import fixtures_dir

# The ``released=`` line each arch plugin needs; until the plugins declare it, the specs here
# get it through spec.replace. kimi_k25: the text tower inside its multimodal wrapper, untied
# as released.
RELEASED = {
    "kimi_k25": lambda: released_config(
        "kimi_k25", lambda text: Kimi_K25Config(text_config=text, tie_word_embeddings=False)),
    "deepseek_v3": lambda: released_config("deepseek_v3", DeepseekV3Config),
    "glm4_moe": lambda: released_config("glm4_moe", Glm4MoeConfig),
    "qwen3_moe": lambda: released_config("qwen3_moe", Qwen3MoeConfig),
    "gpt_oss": lambda: released_config("gpt_oss", GptOssConfig),
    "minimax_m2": lambda: released_config("minimax_m2", MiniMaxM2Config),
    "mixtral": lambda: released_config("mixtral", MixtralConfig),
}
DRY_RUN_BUDGET_S = 30.0  # all seven released configs, serially, on the 2-core CPU machine


def released_for(arch: str):
    return RELEASED[arch]()


def base_spec(arch: str):
    from moe_conformance.registry import discover

    known, _ = discover()
    return known[arch].load()


def with_release(arch: str, name: str | None = None):
    return base_spec(arch).replace(name=name or f"{arch}_released", released=released_for(arch))


# ------------------------------------------------------------------------------------------
# planted bugs


class _ConverterWith:
    """The arch's converter, one direction replaced; every other attribute delegated."""

    def __init__(self, base, *, to_candidate=None, to_hf=None):
        self.base, self._to_candidate, self._to_hf = base, to_candidate, to_hf

    def __getattr__(self, name):
        return getattr(self.base, name)

    def to_candidate(self, state, config):
        return (self._to_candidate or _call)(self.base.to_candidate, state, config)

    def to_hf(self, state, config):
        return (self._to_hf or _call)(self.base.to_hf, state, config)


def _call(fn, state, config):
    from moe_conformance.contract import convert

    return convert(fn, state, config)


_EXPERT = re.compile(r"(\.experts\.)(\d+)(\.)")


def _narrow_expert_index(state: dict, dtype: torch.dtype) -> dict:
    """Per-expert keys renumbered through a narrow integer (uint8: 256 -> 0, 300 -> 44; int8:
    128 -> -128): experts collide or get foreign names, as in a converter that keeps the expert
    index in a uint8/int8 buffer."""
    def wrap(key):
        return _EXPERT.sub(lambda m: m.group(1) + str(int(torch.tensor(int(m.group(2))).to(dtype))) + m.group(3), key)

    return {wrap(k): v for k, v in state.items()}


def _narrow_to_hf(dtype: torch.dtype):
    def plant(spec):
        return spec.replace(converter=_ConverterWith(
            spec.converter, to_hf=lambda fn, state, config: _narrow_expert_index(_call(fn, state, config), dtype)))

    return plant


def _uint8_to_candidate(spec):
    return spec.replace(converter=_ConverterWith(
        spec.converter,
        to_candidate=lambda fn, state, config: _call(fn, _narrow_expert_index(state, torch.uint8), config)))


def _first_dense_capped(spec):
    """The candidate reads first_k_dense_replace but caps it at 1 (the tiny configs' value)."""
    base = spec.candidate

    def candidate(config):
        config = copy.deepcopy(config)
        cfg = spec.model_config(config)
        cfg.first_k_dense_replace = min(cfg.first_k_dense_replace, 1)
        if getattr(cfg, "mlp_layer_types", None):  # configs that derive the per-layer kinds
            cfg.mlp_layer_types = ["dense" if i < 1 else "sparse" for i in range(cfg.num_hidden_layers)]
        return base(config)

    return spec.replace(candidate=candidate)


BUGS = {"uint8_to_hf": _narrow_to_hf(torch.uint8), "int8_to_hf": _narrow_to_hf(torch.int8),
        "uint8_to_candidate": _uint8_to_candidate, "first_dense_capped": _first_dense_capped}


def build(bug: str, arch: str):
    return BUGS[bug](with_release(arch, f"{arch}_{bug}"))


def _loader(expression: str) -> str:
    """Plugin source that loads this file as ``dry_run_planted`` (the suite module is named
    test_dry_run too) and declares ``expression`` (in terms of ``_mod``)."""
    here = Path(__file__).resolve()
    return (
        f"import importlib.util, sys\nsys.path.insert(0, {str(here.parent)!r})\n"
        f"_spec = importlib.util.spec_from_file_location('dry_run_planted', {str(here)!r})\n"
        "_mod = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_mod)\n"
        f"{expression}\n"
    )


def _plugin_source(bug: str, arch: str) -> str:
    return _loader(f"ARCH = _mod.build({bug!r}, {arch!r})")


def _run(pytester, bug: str, arch: str, suite: str = "test_dry_run.py", select: str = "faithful"):
    result, reports = run_suites(pytester, "-k", select, suite=suite, plugin_name=f"{arch}_{bug}",
                                 plugin_source=_plugin_source(bug, arch), subprocess=True)
    assert reports, result.stdout.str()[-3000:]
    (report,) = reports.values()
    return result, checks_by_name(report)


def _assert_failed(checks: dict, check: str, fragments: list[str]) -> None:
    hits = {n: c for n, c in checks.items() if n.startswith(check + "[")}
    assert hits, f"no {check} in {sorted(checks)}"
    for name, c in hits.items():
        assert c["status"] == "failed", f"{name}: {c['status']} {c['message'][:500]}"
        for fragment in fragments:
            assert fragment in c["message"], f"{name} message lacks {fragment!r}:\n{c['message']}"


# ------------------------------------------------------------------------------------------
# released configs


@pytest.mark.parametrize("arch", sorted(RELEASED))
def test_released_config_holds_the_file_values(arch):
    assert arch in known_releases()
    values = read_released(arch)
    config = released_for(arch)()
    model_cfg = getattr(config, "text_config", config)
    for key, value in values.items():
        if key in FILE_METADATA_KEYS or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if hasattr(model_cfg, key):
            assert getattr(model_cfg, key) == value, f"{arch}: {key} = {getattr(model_cfg, key)!r}, file {value!r}"
    assert released_for(arch)() is not config, "each call builds a fresh config"


def test_unknown_release_names_the_committed_ones():
    with pytest.raises(FileNotFoundError, match="deepseek_v3"):
        released_config("no_such_model", dict)()


def test_layouts_parse_and_refuse_junk():
    assert parse_layouts("ep8, ep64,ep16tp2") == [Layout(8), Layout(64), Layout(16, 2)]
    with pytest.raises(ValueError, match="ep<N>"):
        parse_layouts("tp8")


def test_per_rank_arithmetic():
    # 4 experts of 100 params each (bf16), 60 other params (bf16), top-2
    counts = ParamCounts(total=460, routed=400, num_experts=4, top_k=2, total_bytes=920, routed_bytes=800)
    assert counts.active == 60 + 200
    rank = counts.per_rank(Layout(ep=2, tp=2))
    assert rank["experts_per_rank"] == 2 and rank["params_per_rank"] == 30 + 200
    assert math.isclose(rank["param_gib_per_rank"] * 2**30, 60 + 400)
    assert math.isclose(rank["train_gib_per_rank"] * 2**30, 460 + 12 * 230)
    over = counts.per_rank(Layout(ep=8))
    assert over["experts_per_rank"] == 1 and over["idle_expert_ranks"] == 4


def test_schema_problems_name_the_key_and_shape():
    a = {"x.experts.255.w": TensorSpec((4, 2), torch.bfloat16), "y": TensorSpec((3,), torch.float32)}
    b = {"x.experts.255.w": TensorSpec((2, 4), torch.bfloat16), "y": TensorSpec((3,), torch.bfloat16),
         "z": TensorSpec((1,), torch.bfloat16)}
    problems = schema_problems(a, b, "A", "B")
    assert any("x.experts.255.w: shape [2, 4] in B, [4, 2] in A" in p for p in problems)
    assert any("y: dtype" in p for p in problems)
    assert any("not in A: z [1] bfloat16" in p for p in problems)
    assert not any("y:" in p for p in schema_problems(a, b, "A", "B", dtypes=False))


# ------------------------------------------------------------------------------------------
# the suite on the real releases, and on planted bugs


@pytest.mark.slow
def test_seven_releases_pass_within_budget(pytester):
    source = _loader(f"ARCHS = [_mod.with_release(n) for n in {sorted(RELEASED)!r}]")
    result, files = run_suites(pytester, suite="test_dry_run.py", plugin_name="released_plugins",
                               plugin_source=source, subprocess=True)
    reports = {r["arch"]: r for r in files.values()}  # <arch>.json, or <arch>.partial.json for one family
    assert len(reports) == len(RELEASED), result.stdout.str()[-3000:]
    wall = cpu = 0.0
    for report in reports.values():
        for c in report["checks"]:
            assert c["status"] == "passed", f"{c['name']}: {c['status']}: {c['message'][:800]}"
            wall += c["figures"]["timing"]["wall_s"]
            cpu += c["figures"]["timing"]["cpu_s"]
        (params,) = [c for c in report["checks"] if c["name"].startswith("test_dry_run_parameters")]
        assert params["figures"]["params_delta"] == 0
    published = {"deepseek_v3_released": (671e9, 37e9), "qwen3_moe_released": (235e9, 22e9),
                 "mixtral_released": (141e9, 39e9)}
    for arch, (total, active) in published.items():
        figures = checks_by_name(reports[arch])[f"test_dry_run_parameters[{arch}-faithful]"]["figures"]
        assert abs(figures["params_total"] / total - 1) < 0.01, (arch, figures["params_total"])
        assert abs(figures["params_active"] / active - 1) < 0.03, (arch, figures["params_active"])
    # CPU time: the checks are single-threaded, so on an idle machine it is their wall time
    assert cpu < DRY_RUN_BUDGET_S, f"the dry run of {len(reports)} releases took {cpu:.1f} s CPU ({wall:.1f} s wall)"


def test_not_applicable_without_a_release(pytester):
    source = ("from moe_conformance.registry import discover\n"
              "ARCH = discover()[0]['mixtral'].load().replace(name='mixtral_unreleased', released=None)\n")
    result, reports = run_suites(pytester, suite="test_dry_run.py", plugin_name="unreleased", plugin_source=source)
    (report,) = reports.values()
    statuses = {c["status"] for c in report["checks"]}
    assert statuses == {"not_applicable"}, statuses
    assert all("no released config declared" in c["message"] for c in report["checks"])


@pytest.mark.slow
@pytest.mark.parametrize(("bug", "arch", "first_moe", "fragments"), [
    # 384 experts: 256..383 overwrite 0..127 on the way back to the file
    ("uint8_to_hf", "kimi_k25", 1, ["language_model.model.layers.1.mlp.experts.256.down_proj.weight [7168, 2048] bfloat16"]),
    # 256 experts: 128..255 come out as -128..-1 (listed -1, -2, ...)
    ("int8_to_hf", "deepseek_v3", 3, ["model.layers.3.mlp.experts.128.down_proj.weight [7168, 2048] bfloat16",
                                      "not in the full-size checkpoint: model.layers.3.mlp.experts.-1.down_proj.weight"]),
])
def test_narrow_expert_index_passes_tiny_fails_full_size(pytester, bug, arch, first_moe, fragments):
    # tiny (12 experts): the bit-exact roundtrips hold, the bug is invisible there
    _, tiny = _run(pytester, bug, arch, "test_roundtrip.py", "faithful and bit_exact")
    assert len(tiny) == 2 and all(c["status"] == "passed" for c in tiny.values()), {n: c["status"] for n, c in tiny.items()}
    _, full = _run(pytester, bug, arch)
    _assert_failed(full, "test_dry_run_roundtrip", ["missing from to_hf(to_candidate(checkpoint))", *fragments])
    assert all(c["status"] == "passed" for n, c in full.items() if not n.startswith("test_dry_run_roundtrip"))


@pytest.mark.slow
def test_uint8_index_is_right_for_256_experts(pytester):
    """DeepSeek-V3's experts 0..255 fit a uint8: no finding (the check is not a pattern match)."""
    _, full = _run(pytester, "uint8_to_hf", "deepseek_v3")
    assert {c["status"] for c in full.values()} == {"passed"}, {n: c["message"][:300] for n, c in full.items()}


@pytest.mark.slow
def test_uint8_expert_index_in_to_candidate_fails_full_size(pytester):
    # experts 256..383 land on 0..127 before stacking: 256 experts stacked where 384 belong
    _, full = _run(pytester, "uint8_to_candidate", "kimi_k25")
    _assert_failed(full, "test_dry_run_to_candidate", [
        "does not match the full-size candidate's own state dict",
        "layers.1.moe.experts.w1: shape [256, 2048, 7168] in to_candidate(checkpoint), [384, 2048, 7168] in the full-size "
        "candidate"])


@pytest.mark.slow
def test_candidate_with_capped_dense_layers_fails_parameters(pytester):
    _, full = _run(pytester, "first_dense_capped", "deepseek_v3")
    _assert_failed(full, "test_dry_run_parameters", ["does not hold the reference's parameters",
                                                     "layers.1.moe.experts.w1 [256, 2048, 7168]"])
    _assert_failed(full, "test_dry_run_to_candidate", ["layers.1.feed_forward.w1.weight [18432, 7168]"])


def test_fixture_files_are_plain_published_json():
    folder = fixtures_dir() / "released"
    assert (folder / "README.md").is_file(), "provenance of every value: fixtures/released/README.md"
    for path in sorted(folder.glob("*.json")):
        values = json.loads(path.read_text())
        assert isinstance(values, dict) and "hidden_size" in values, path.name


def test_full_size_figures_cross_xdist(pytester):
    """A candidate without the release's MTP layers is 13.5e9 parameters short at full size: a
    figure past the 32-bit integers xdist's wire format carries (the figures travel as JSON)."""
    result, reports = run_suites(pytester, "-k", "faithful and test_dry_run_parameters", "-n", "2",
                                 suite="test_dry_run.py", plugin_name="mtp_dropped",
                                 plugin_source=f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                                               "import planted_wave3\nARCH = planted_wave3.build('mtp_skipped')\n",
                                 subprocess=True)
    assert "INTERNALERROR" not in result.stdout.str(), result.stdout.str()[-3000:]
    (report,) = reports.values()
    (check,) = report["checks"]
    assert check["status"] == "failed" and "declared extra tensors" in check["message"], check
    assert check["figures"]["params_delta"] < -2**31, check["figures"]
