"""Expert LoRA merges (family ``lora_merge``, F20; BUGS.md #45).

LoRA adapters (rank 4) on two routed experts of every MoE layer (of each stacked expert
weight), on the router and on every shared-expert weight, attached to the candidate by the
team's adapter code (``ArchSpec(merging=MergeHooks(...))``; the project's own otherwise), given
non-zero values, then merged into the weights and exported with ``to_hf``:

- ``test_lora_merge_matches_unmerged``: the merged candidate (loaded back from the merged
  checkpoint) computes the unmerged candidate's logits;
- ``test_lora_merge_changes_exactly_the_targets``: every on-disk tensor an adapter targets moved
  by exactly its ``alpha / r * B @ A``, and every other tensor (the untouched experts above all)
  is bit-identical to the base checkpoint (a delta silently dropped for fused experts, or spread
  over all of them, is named);
- ``test_lora_merged_checkpoint_roundtrips``: the merged checkpoint converts back bit-exactly and
  loads into the reference, which then computes the unmerged candidate's logits;
- ``test_lora_adapters_train``: every adapter is trainable and gets a gradient from the loss
  (expert LoRA "enabled" but frozen is named).
Runs on the faithful variant (the merge does not depend on the stress variants' branches).
"""

from __future__ import annotations

import weakref

import pytest
import torch

from moe_conformance import data, merging, tokenizer, tolerances, training
from moe_conformance.checkpoint import load_reference, state_diff, write_checkpoint
from moe_conformance.checks import conformance, needs_router_module
from moe_conformance.compare import run_candidate, run_reference

pytestmark = pytest.mark.arch_variants("faithful")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# a merged weight is W + s * B @ A rounded once in fp32; the adapter product itself is exact to
# ~1e-7 relative, so 1e-5 of the weights' scale separates "the delta" from "not the delta"
DELTA_RELATIVE = 1e-5


def _prepared(arch) -> dict:
    """The base candidate, its targets, the unmerged candidate's logits and the merged export
    (computed once per case and process)."""
    if arch not in _CACHE:
        hooks = merging.hooks_for(arch.spec)
        base = arch.candidate()
        targets = merging.lora_targets(arch, base)
        keys = merging.target_disk_keys(arch, base, targets)
        model = arch.candidate()
        adapters = hooks.attach(model, targets, merging.RANK, merging.ALPHA)
        merging.fill_adapters(adapters, arch.case_seed)
        deltas = {t: (merging.ALPHA / merging.RANK * (B @ A)).detach().clone() for t, (A, B) in adapters.items()}
        with torch.no_grad():
            unmerged = {name: run_candidate(model, batch) for name, batch in arch.batches.items()}
        merged_model = hooks.merge(model)
        # on the CPU, like the on-disk state it is compared with (the model may be on a GPU)
        merged = arch.to_hf({k: v.detach().cpu().clone() for k, v in merged_model.state_dict().items()})
        _CACHE[arch] = {"hooks": hooks, "targets": targets, "keys": keys, "adapters": adapters, "deltas": deltas,
                        "unmerged": unmerged, "merged": merged, "base": base}
    return _CACHE[arch]


def _gate(arch) -> float:
    return tolerances.profile("logit_parity", "float32", arch.spec.tolerances).thresholds()["max_abs_logit_delta"]


def _reference_inputs(arch) -> list[str]:
    """The input cases on which the unmerged reference and candidate agree: a divergence of the
    reference's own (gpt-oss's packed documents) is logit parity's finding, not the merge's."""
    ref, cand = arch.reference(), arch.candidate()
    with torch.no_grad():
        return [name for name, batch in arch.batches.items()
                if float((run_reference(ref, batch) - run_candidate(cand, batch)).abs()[batch.valid].max()) <= _gate(arch)]


def _parity(arch, logits_of, record, what: str, inputs=None) -> None:
    prep = _prepared(arch)
    gate = _gate(arch)
    worst = 0.0
    inputs = list(arch.batches) if inputs is None else inputs
    with torch.no_grad():
        for name in inputs:
            batch = arch.batches[name]
            d = (logits_of(batch) - prep["unmerged"][name]).abs()[batch.valid].max()
            worst = max(worst, float(d))
    record(figures={"max_abs_logit_delta": worst, "inputs": inputs}, thresholds={"max_abs_logit_delta": gate})
    if not worst <= gate:
        arch.fail(f"{what} does not compute the unmerged candidate's logits",
                  [f"max_abs_logit_delta = {worst:.3g} (gate: <= {gate:.3g})"] + _merge_faults(arch)[:4])


def _merge_faults(arch) -> list[str]:
    """What the merged checkpoint got wrong, target by target (also the diagnosis of the
    logit checks)."""
    prep = _prepared(arch)
    base, merged, problems = arch.disk_state, prep["merged"], []
    expected = dict(base)
    with torch.no_grad():
        want_state = {k: v.detach().cpu().clone() for k, v in prep["base"].state_dict().items()}
        for t, delta in prep["deltas"].items():
            view = want_state[t.tensor] if t.expert is None else want_state[t.tensor][t.expert]
            view.add_(delta.to(view))
    expected = arch.to_hf(want_state)
    targeted = {k: t for t, keys in prep["keys"].items() for k in keys}
    for key in sorted(set(base) & set(merged)):
        b, m, e = base[key], merged[key], expected[key]
        if key in targeted:
            scale = float(e.double().abs().max()) or 1.0
            off = float((m.double() - e.double()).abs().max()) / scale
            if torch.equal(m, b):
                problems.append(f"{key}: the delta of {targeted[key].describe()} was silently dropped on merge "
                                f"(bit-identical to the base checkpoint)")
            elif off > DELTA_RELATIVE:
                problems.append(f"{key}: {targeted[key].describe()} merged wrongly (relative max|merged - "
                                f"(base + alpha/r * B @ A)| {off:.3g})")
        elif not torch.equal(m, b):
            problems.append(f"{key}: changed by the merge, but no adapter targets it (a delta applied to an untouched "
                            f"expert or tensor; max|delta| {float((m.double() - b.double()).abs().max()):.3g})")
    missing, unexpected = sorted(set(base) - set(merged)), sorted(set(merged) - set(base))
    if missing or unexpected:
        problems.insert(0, f"the merged checkpoint's key set differs: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return problems


@conformance(applies=needs_router_module)
def test_lora_merge_matches_unmerged(arch, record):
    prep = _prepared(arch)
    record(figures={"targets": len(prep["targets"]),
                    "targets_by_role": {r: sum(t.role == r for t in prep["targets"]) for r in ("routed", "shared", "router")}})
    reloaded = arch.candidate(state=arch.to_candidate(prep["merged"]))
    _parity(arch, lambda batch: run_candidate(reloaded, batch), record, "the candidate loaded from the merged checkpoint")


@conformance(applies=needs_router_module)
def test_lora_merge_changes_exactly_the_targets(arch, record):
    prep = _prepared(arch)
    problems = _merge_faults(arch)
    changed = sum(1 for k in prep["merged"] if k in arch.disk_state and not torch.equal(prep["merged"][k], arch.disk_state[k]))
    untargeted = [t.describe() for t, keys in prep["keys"].items() if not keys]
    if untargeted:
        problems.append(f"targets that feed no on-disk tensor: {untargeted[:3]}")
    record(figures={"targeted_keys": sum(len(v) for v in prep["keys"].values()), "changed_keys": changed})
    if problems:
        arch.fail("the merge does not change exactly the targeted tensors by their deltas", problems)


@conformance(applies=needs_router_module)
def test_lora_merged_checkpoint_roundtrips(arch, record, tmp_path):
    prep = _prepared(arch)
    merged = prep["merged"]
    back = arch.to_hf(arch.to_candidate(merged))
    problems = state_diff(merged, back)
    if problems:
        arch.fail("merged checkpoint -> candidate -> HF is not the merged checkpoint", problems)
    source = arch.save_reference(tmp_path / "original")
    folder = write_checkpoint(tmp_path / "merged", merged, source)
    prefix = getattr(arch.spec.converter, "disk_prefix", "")
    reference = load_reference(type(arch.reference()), folder, prefix, ignore=arch.extra_disk_keys).to(arch.device)
    _parity(arch, lambda batch: run_reference(reference, batch), record, "the reference loaded from the merged checkpoint",
            inputs=_reference_inputs(arch))


@conformance(applies=needs_router_module)
def test_lora_adapters_train(arch, record):
    prep = _prepared(arch)
    model = arch.candidate().train()
    adapters = prep["hooks"].attach(model, prep["targets"], merging.RANK, merging.ALPHA)
    merging.fill_adapters(adapters, arch.case_seed)
    tok = tokenizer.load()
    batch = data.lm_batch(tok, 8, arch.case_seed + 3).to(arch.device)
    tap = training.routing_tap(arch, model, "cand")
    loss = training.lm_backward(model, batch, False, tap)
    # an expert that got no loss-bearing token rightly gets a zero gradient
    rows = batch.loss_mask.reshape(-1)
    loads = {layer.experts: training.loads(idx, arch.num_experts, rows)
             for layer, idx in zip([l for l in tap.layers if l.experts], tap.indices)}
    problems, idle = [], 0
    for target, (A, B) in adapters.items():
        owner = target.tensor.rpartition(".")[0]
        unused = target.expert is not None and owner in loads and loads[owner][target.expert] == 0
        idle += int(unused)
        for name, p in (("A", A), ("B", B)):
            if not p.requires_grad:
                problems.append(f"the adapter of {target.describe()} is frozen ({name}: requires_grad=False): the LoRA is "
                                f"'enabled' but never trains")
            elif p.grad is None or not torch.isfinite(p.grad).all() or (not unused and not p.grad.abs().max() > 0):
                problems.append(f"the adapter of {target.describe()} gets no usable gradient ({name}.grad "
                                f"{'None' if p.grad is None else 'zero or non-finite'})")
    missing = [t.describe() for t in prep["targets"] if t not in adapters]
    if missing:
        problems.append(f"attach() returned no adapter for {len(missing)} target(s): {missing[:3]}")
    record(figures={"lm_loss": loss, "adapters": len(adapters), "adapters_on_idle_experts": idle})
    if problems:
        arch.fail("LoRA adapters do not train", problems)
