"""The contract, checked on the actual candidate (the ``contract`` family runs these first).

Each item is a function of the case that returns ``None`` (the convention holds) or a message
naming the convention and what to declare or change. Results are computed once per case and
process, in the same way in every process, so a check that depends on an item can be reported
"blocked by contract: ..." wherever it runs (serially or on any pytest-xdist worker), with the
one root cause instead of misleading numbers.

Items and what depends on them:

- ``forward``: by keyword on every input case, logits [B, S, vocab], finite. Everything.
- ``converter``: ``to_candidate`` of the checkpoint loads strictly (key sets named both ways),
  ``to_hf`` gives back the checkpoint's key set, neither mutates its input.
- ``state``: ``copy.deepcopy`` and a state_dict round-trip keep the logits.
- ``deterministic``: two eval forwards give identical logits (dropout off).
- ``pairs``: every declared module pair names modules that exist on both sides.
- ``routing``: the router/experts probes give well-formed decisions on every MoE layer: indices
  [T, K] in [0, E) and distinct per token, K = top_k, weights [T, K] finite and >= 0, logits
  [T, E] where given, weight sums as norm_topk_prob and routed scaling say.
- ``experts``: the experts probe's ``call`` computes [T, H] for given choices.
- ``capabilities``: the declared capabilities agree with the reference config and checkpoint.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from . import routing as routing_oracle
from .checkpoint import fingerprint
from .contract import ProbeError
from .probing import RoutingTap, routing_layers

ITEMS = ("forward", "converter", "deterministic", "state", "pairs", "routing", "experts", "capabilities")
# what an item needs to be checkable at all
# (a nondeterministic candidate makes every comparison of two forwards meaningless: state
# waits for determinism)
DEPENDS = {"forward": (), "converter": (), "deterministic": ("forward", "converter"),
           "state": ("forward", "converter", "deterministic"),
           "pairs": ("converter",), "routing": ("forward", "converter", "pairs"),
           "experts": ("converter", "pairs"), "capabilities": ()}


def _logits(output) -> torch.Tensor | None:
    from .case import logits_of

    try:
        return logits_of(output)
    except TypeError:
        return None


def check_forward(case) -> str | None:
    # a freshly built candidate: the forward convention does not depend on the converter
    try:
        model = case.spec.candidate(copy.deepcopy(case.config)).to(case.device).eval()
    except Exception as exc:  # noqa: BLE001
        return f"building the candidate from the config raised {type(exc).__name__}: {exc}"
    vocab = case.model_config.vocab_size
    low_precision = case.dtype != torch.float32
    if low_precision:  # the profile's checks run the candidate cast; a forward that cannot is one cause
        dtype = str(case.dtype).removeprefix("torch.")
        try:
            model = case.spec.cast(model, case.dtype, frozenset())
        except Exception as exc:  # noqa: BLE001
            return f"ArchSpec.cast(candidate, {dtype}) raised {type(exc).__name__}: {exc}{_where(exc)}"
    for name, batch in case.batches.items():
        try:
            with torch.no_grad():
                out = model(**batch.kwargs)
        except Exception as exc:  # noqa: BLE001
            cast = f"the candidate cast to {dtype} (ArchSpec.cast, --dtype {dtype}): " if low_precision else ""
            return (f"{cast}forward(input_ids=, attention_mask=, position_ids=) by keyword on '{name}' inputs raised "
                    f"{type(exc).__name__}: {exc}{_where(exc)}")
        logits = _logits(out)
        if logits is None:
            return (f"forward returned a {type(out).__name__}: expected logits as a tensor, an object with .logits, "
                    f"or a tuple whose first item is the logits")
        want = (*batch.input_ids.shape, vocab)
        if tuple(logits.shape) != want:
            return f"forward on '{name}' inputs returned logits of shape {tuple(logits.shape)}, expected {want} [B, S, vocab]"
        if not torch.isfinite(logits[batch.valid]).all():
            return f"forward on '{name}' inputs returned non-finite logits at valid positions"
    return None


def _where(exc: BaseException) -> str:
    """', at FILE:LINE in FUNCTION': the innermost frame outside torch, where the candidate's own
    code called what raised."""
    import traceback

    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if f"{os.sep}torch{os.sep}" not in frame.filename and not frame.filename.endswith("contract_checks.py"):
            return f", at {Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return ""


def _mutation(state_before: dict[str, str], state: dict[str, torch.Tensor]) -> list[str]:
    changed = [k for k, fp in state_before.items() if k not in state or fingerprint(state[k]) != fp]
    added = [k for k in state if k not in state_before]
    return changed + added


def check_converter(case) -> str | None:
    from .contract import convert

    conv = case.spec.converter
    disk = {k: v.clone() for k, v in case.disk_state.items()}
    before = {k: fingerprint(v) for k, v in disk.items()}
    try:
        cand_state = convert(conv.to_candidate, disk, case.config)
    except Exception as exc:  # noqa: BLE001
        return f"to_candidate(checkpoint, config) raised {type(exc).__name__}: {exc}"
    mutated = _mutation(before, disk)
    if mutated:
        return (f"to_candidate mutates its input (changed or added {len(mutated)} key(s), e.g. {mutated[:3]}): "
                f"a converter must not modify the state it is given")
    model = case.spec.candidate(copy.deepcopy(case.config))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(cand_state)), sorted(set(cand_state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} key(s) the candidate has ({', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"has {len(unexpected)} key(s) the candidate does not ({', '.join(unexpected[:4])})")
        return "to_candidate(checkpoint) does not match the candidate's state_dict(): it " + " and ".join(parts)
    shapes = [f"{k}: {tuple(cand_state[k].shape)} vs the candidate's {tuple(v.shape)}"
              for k, v in own.items() if tuple(cand_state[k].shape) != tuple(v.shape)]
    if shapes:
        return f"to_candidate gives tensors of the wrong shape: {'; '.join(shapes[:3])}"
    try:
        model.load_state_dict(cand_state, strict=True)
    except Exception as exc:  # noqa: BLE001
        return f"load_state_dict(to_candidate(checkpoint), strict=True) raised {type(exc).__name__}: {exc}"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = {k: fingerprint(v) for k, v in state.items()}
    try:
        back = convert(conv.to_hf, state, case.config)
    except Exception as exc:  # noqa: BLE001
        return f"to_hf(candidate state, config) raised {type(exc).__name__}: {exc}"
    mutated = _mutation(before, state)
    if mutated:
        return f"to_hf mutates its input (e.g. {mutated[:3]}): a converter must not modify the state it is given"
    # declared extras a candidate does not hold (MTP layers its model lacks) are a lossy
    # conversion, not a broken convention: the roundtrip family names them, nothing is blocked
    missing = sorted(set(case.disk_state) - set(back))
    unexpected = sorted(set(back) - set(case.disk_state))
    if set(missing) - case.extra_disk_keys or unexpected:
        return (f"to_hf(candidate state) does not give the checkpoint's key set: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}")
    return None


def check_state(case) -> str | None:
    model = case.candidate()
    batch = case.batches["plain"]
    with torch.no_grad():
        want = _logits(model(**batch.kwargs))
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001
        return (f"copy.deepcopy(candidate) raised {type(exc).__name__}: {exc} (a tensor or handle stashed on a module "
                f"that cannot be copied: keep state in parameters and buffers)")
    try:
        with torch.no_grad():
            got = _logits(clone(**batch.kwargs))
    except Exception as exc:  # noqa: BLE001
        return (f"a deep copy of the candidate fails its forward: {type(exc).__name__}: {exc} (state stashed on a "
                f"module outside parameters/buffers does not survive copying)")
    if not torch.equal(want, got):
        return (f"a deep copy of the candidate computes different logits (max|delta| "
                f"{float((want - got).abs().max()):.3g}): state outside parameters/buffers is lost in copying")
    fresh = case.spec.candidate(copy.deepcopy(case.config))
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh = fresh.to(case.device).eval()
    with torch.no_grad():
        again = _logits(fresh(**batch.kwargs))
    if not torch.equal(want, again):
        return (f"a fresh candidate loaded with state_dict() computes different logits (max|delta| "
                f"{float((want - again).abs().max()):.3g}): state_dict() does not hold everything the forward uses")
    return None


def check_deterministic(case) -> str | None:
    model = case.candidate()
    batch = case.batches["plain"]
    with torch.no_grad():
        first = _logits(model(**batch.kwargs))
        second = _logits(model(**batch.kwargs))
    if not torch.equal(first, second):
        d = float((first.double() - second.double()).abs().max())
        return (f"two eval-mode forwards on the same input differ by up to {d:.3g}: the candidate is not deterministic "
                f"in eval mode (dropout or router jitter left on in eval, or nondeterministic kernels)")
    return None


def check_pairs(case) -> str | None:
    pairs = case.module_pairs()
    if not pairs:
        return ("no module pairs declared: declare Probes(pairs=[ModulePair(ref, cand, role), ...]) so that failures "
                "can be localized and routing read")
    ref = dict(case.reference().named_modules())
    cand = dict(case.candidate().named_modules())
    # a layer may legitimately lack a module (dense layers have no router), and one reference
    # module may pair with alternatives (mlp <-> moe or feed_forward): a pair is wrong when the
    # candidate module exists without its reference module, or when a present reference module
    # has none of its candidate alternatives
    alternatives: dict[str, list[str]] = {}
    for p in pairs:
        alternatives.setdefault(p.ref, []).append(p.cand)
    orphans = [f"{p.cand} (its reference {p.ref} does not exist)" for p in pairs if p.cand in cand and p.ref not in ref]
    unmatched = [f"{r} (candidate {' or '.join(c)})" for r, c in alternatives.items()
                 if r in ref and not any(x in cand for x in c)]
    if orphans or unmatched:
        parts = []
        if unmatched:
            parts.append(f"{len(unmatched)} reference module(s) have no candidate module: {', '.join(unmatched[:3])}")
        if orphans:
            parts.append(f"{len(orphans)} candidate module(s) have no reference module: {', '.join(orphans[:3])}")
        return "declared module pairs name modules that do not exist: " + "; ".join(parts)
    if not any(p.ref in ref for p in pairs):
        return f"none of the {len(pairs)} declared module pairs exists in the models"
    return None


def _reading_problems(case, layer, reading, tokens: int) -> list[str]:
    cfg = case.model_config
    E, K = case.num_experts, routing_oracle.top_k(cfg)
    where = f"layer {layer.layer} ({layer.router or layer.experts})"
    out = []
    if reading.indices is None or reading.weights is None:
        return [f"{where}: the probes give no expert indices/weights (a router that only scores needs "
                f"ExpertsProbe(read_choice=...) to read the choice where the experts receive it)"]
    idx, w = reading.indices.reshape(-1, reading.indices.shape[-1]), reading.weights.reshape(-1, reading.weights.shape[-1])
    if idx.shape[0] != tokens:
        out.append(f"{where}: routing for {idx.shape[0]} tokens, the batch has {tokens}")
    if idx.shape[-1] != K:
        out.append(f"{where}: router picks {idx.shape[-1]} experts per token, the config's top_k is {K}")
    if idx.is_floating_point():
        out.append(f"{where}: expert indices are {idx.dtype}, expected an integer tensor")
    elif idx.numel() and (idx.min() < 0 or idx.max() >= E):
        out.append(f"{where}: expert indices outside [0, {E}): min {int(idx.min())}, max {int(idx.max())}")
    elif idx.numel() and (idx.sort(-1).values.diff(dim=-1) == 0).any():
        out.append(f"{where}: a token picks the same expert twice")
    if tuple(w.shape) != tuple(idx.shape):
        out.append(f"{where}: weights have shape {tuple(w.shape)}, indices {tuple(idx.shape)}")
    elif not torch.isfinite(w).all() or (w < 0).any():
        out.append(f"{where}: routing weights are not finite and >= 0 (min {float(w.min()):.3g})")
    elif case.spec.capabilities.router_scoring != "softmax_topk":
        oracle = routing_oracle.from_config(cfg, case.spec.capabilities.router_scoring)
        if oracle.norm_topk_prob:
            sums = w.double().sum(-1)
            want = oracle.routed_scaling_factor
            if (sums - want).abs().max() > 1e-3 * max(want, 1.0):
                out.append(f"{where}: routing weights sum to {float(sums.min()):.4g}..{float(sums.max()):.4g} per token; "
                           f"with norm_topk_prob and routed_scaling_factor {want:g} they sum to {want:g} (weights "
                           f"returned before renormalization or scaling, or the probe reads the wrong value)")
    if reading.logits is not None:
        lg = reading.logits.reshape(-1, reading.logits.shape[-1])
        if tuple(lg.shape) != (tokens, E):
            out.append(f"{where}: router logits have shape {tuple(lg.shape)}, expected [T={tokens}, E={E}]")
    return out


def check_routing(case) -> str | None:
    model = case.candidate()
    try:
        tap = RoutingTap(model, case, "cand")
    except ProbeError as exc:
        return str(exc)
    if case.spec.probes.router is None and (case.spec.probes.experts is None or case.spec.probes.experts.read_choice is None):
        return "no probe can read the candidate's routing: declare a RouterProbe or ExpertsProbe(read_choice=...)"
    batch = case.batches["plain"]
    with torch.no_grad(), tap():
        model(**batch.kwargs)
    if tap.errors:
        return tap.errors[0]
    problems = []
    for layer in tap.layers:
        reading = tap.readings.get(layer.layer)
        if reading is None:
            problems.append(f"layer {layer.layer} ({layer.router or layer.experts}): the declared module never ran")
            continue
        problems += _reading_problems(case, layer, reading, batch.input_ids.numel())
    return "; ".join(problems[:3]) if problems else None


def check_experts(case) -> str | None:
    probe = case.spec.probes.experts
    if probe is None:
        return None
    model = case.candidate()
    modules = dict(model.named_modules())
    layers = [l for l in routing_layers(case, "cand", model) if l.experts]
    if not layers:
        return "no module pair with role 'experts' names a module of the candidate"
    H, K, E = case.model_config.hidden_size, routing_oracle.top_k(case.model_config), case.num_experts
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(case.case_seed)).to(case.device)
    idx = (torch.arange(5 * K) % E).reshape(5, K).to(case.device)
    w = torch.full((5, K), 1.0 / K, device=case.device)
    try:
        with torch.no_grad():
            out = probe.call(modules[layers[0].experts], x, idx, w)
    except Exception as exc:  # noqa: BLE001
        return (f"ExpertsProbe.call({layers[0].experts}, x [T, H], indices [T, K], weights [T, K]) raised "
                f"{type(exc).__name__}: {exc} (declare ExpertsProbe(call=...) for experts called another way)")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (5, H):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return f"ExpertsProbe.call on {layers[0].experts} returned {shape}, expected [T=5, H={H}]"
    # the call must compute what it is asked: with one expert per token at weight 1, then two
    # experts at weights a and b, the output is a*out_i + b*out_j (a call that bakes in another
    # K, or reads the arguments in another order, mixes tokens up without an error)
    module = modules[layers[0].experts]
    i, j = idx[:, :1] % E, (idx[:, :1] + 1) % E
    one = torch.ones(5, 1, device=case.device)
    a = torch.linspace(0.2, 0.7, 5, device=case.device)[:, None]
    with torch.no_grad():
        out_i, out_j = probe.call(module, x, i, one), probe.call(module, x, j, one)
        both = probe.call(module, x, torch.cat((i, j), dim=1), torch.cat((a, 1 - a), dim=1))
    want = a * out_i + (1 - a) * out_j
    delta = float((both.double() - want.double()).abs().max() / want.abs().max().clamp_min(1e-30))
    if not delta <= 1e-4:
        return (f"ExpertsProbe.call on {layers[0].experts} does not compute the weighted sum of the experts it is "
                f"given: call(x, [i, j], [a, 1-a]) differs from a*call(x, [i], [1]) + (1-a)*call(x, [j], [1]) by "
                f"{delta:.3g} relative (a top-k baked in at build time, or indices and weights read in another order)")
    return None


def _config_has_shared(cfg) -> bool:
    shared = getattr(cfg, "n_shared_experts", None) or 0
    return bool(shared) or bool(getattr(cfg, "shared_expert_intermediate_size", 0) or 0)


def check_capabilities(case) -> str | None:
    caps, cfg, disk = case.spec.capabilities, case.model_config, case.disk_state
    problems = []
    has_shared = _config_has_shared(cfg) or any("shared_expert" in k or "shared_mlp" in k for k in disk)
    if has_shared != caps.shared_experts:
        problems.append(f"capabilities.shared_experts={caps.shared_experts}, but the reference config/checkpoint "
                        f"{'has' if has_shared else 'has no'} shared experts")
    has_bias = any(k.endswith("e_score_correction_bias") for k in disk)
    if has_bias != caps.correction_bias:
        problems.append(f"capabilities.correction_bias={caps.correction_bias}, but the checkpoint "
                        f"{'has' if has_bias else 'has no'} e_score_correction_bias")
    grouped = (getattr(cfg, "n_group", 1) or 1) > 1
    if grouped and not caps.group_limited_routing:
        problems.append("capabilities.group_limited_routing=False, but the config has n_group > 1")
    has_mla = getattr(cfg, "kv_lora_rank", None) is not None and hasattr(cfg, "qk_rope_head_dim")
    if has_mla != (caps.attention == "mla"):
        problems.append(f"capabilities.attention={caps.attention!r}, but the config "
                        f"{'has' if has_mla else 'has no'} MLA fields (kv_lora_rank, qk_rope_head_dim)")
    topology = routing_oracle.from_config(cfg, caps.router_scoring, caps.correction_bias).problems(
        case.num_experts, routing_oracle.top_k(cfg))
    problems += [f"routing topology: {p}" for p in topology]
    return "; ".join(problems) if problems else None


CHECKS: dict[str, Callable] = {
    "forward": check_forward, "converter": check_converter, "state": check_state,
    "deterministic": check_deterministic, "pairs": check_pairs, "routing": check_routing,
    "experts": check_experts, "capabilities": check_capabilities,
}


class ContractStatus:
    """Per case: each item's problem (or None), computed on first use, dependencies first."""

    def __init__(self, case):
        self.case = case
        self._found: dict[str, str | None] = {}

    def problem(self, item: str) -> str | None:
        if item not in self._found:
            for dep in DEPENDS[item]:
                if self.problem(dep) is not None:
                    self._found[item] = f"blocked by {dep}: {self.problem(dep)}"
                    break
            else:
                try:
                    self._found[item] = CHECKS[item](self.case)
                except Exception as exc:  # noqa: BLE001 - a crash in a contract check names the item
                    self._found[item] = f"checking the {item} convention raised {type(exc).__name__}: {exc}"
        return self._found[item]

    def first_problem(self, items) -> tuple[str, str] | None:
        """(item, message) of the first broken item among ``items`` (dependencies first)."""
        for item in ITEMS:
            if item in items or any(item in DEPENDS[i] for i in items):
                found = self.problem(item)
                if found is not None and item in _closure(items):
                    return item, _root(found)
        return None


def _closure(items) -> set[str]:
    out, todo = set(), list(items)
    while todo:
        i = todo.pop()
        if i not in out:
            out.add(i)
            todo += DEPENDS[i]
    return out


def _root(message: str) -> str:
    """The innermost message of a 'blocked by x: ...' chain."""
    return re.sub(r"^(blocked by \w+: )+", "", message)
