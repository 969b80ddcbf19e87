"""Roundtrip losslessness against the on-disk checkpoint.

reference.save_pretrained -> safetensors files -> to_candidate -> strict load into the candidate
-> to_hf, compared bit for bit with the ORIGINAL file tensors (key sets, dtypes, values), and the
other direction (candidate-native weights -> HF -> candidate). The candidate's own expert layout
is checked directly (fingerprints, and each expert's function against the file's expert), since
a permutation or gate/up swap made in both directions survives a roundtrip.
"""

import copy

import pytest
import torch

from moe_conformance.case import read_checkpoint
from moe_conformance.checkpoint import (
    expert_layout_problems,
    expert_outputs,
    fp32_module_suffixes,
    load_reference,
    reference_fp32_rules,
    state_diff,
    write_checkpoint,
)
from moe_conformance.compare import run_reference
from moe_conformance.convert import FuseExperts, StackExperts
from moe_conformance.checks import ANY_DTYPE, conformance

# Expert outputs are compared at fp32 with the same math on both sides; the floor is ~1e-6 of
# the output scale (same as logit parity), so 1e-4 relative separates "same expert" from not.
EXPERT_MATCH_RELATIVE = 1e-4




def _cand_state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@conformance(dtypes=ANY_DTYPE)
def test_hf_to_candidate_to_hf_bit_exact(arch, record):
    disk = arch.disk_state
    cand = arch.candidate()  # strict load of to_candidate(disk)
    back = arch.to_hf(_cand_state(cand))
    record(figures={"checkpoint_tensors": len(disk), "candidate_tensors": len(cand.state_dict())})
    problems = state_diff(disk, back)
    if problems:
        arch.fail("HF file -> candidate -> HF is not the original file", problems)


def _perturbed(state, gen):
    """Every tensor moved by its own noise, except that names of one tensor (a tied head and its
    embedding) move together: training keeps a tie."""
    noise, out = {}, {}
    for k, v in state.items():
        alias = (v.data_ptr(), tuple(v.shape), v.dtype)
        if alias not in noise:
            noise[alias] = torch.randn(v.shape, generator=gen).to(v.dtype) * 1e-3
        out[k] = v.detach().cpu().clone() + noise[alias]
    return out


@conformance(dtypes=ANY_DTYPE)
def test_candidate_to_hf_to_candidate_bit_exact(arch, record):
    # Candidate-native weights (as after training in the candidate's own format): perturb every
    # tensor distinctly so nothing can pass by coinciding with the file.
    gen = torch.Generator().manual_seed(arch.case_seed)
    native = _perturbed(arch.candidate().state_dict(), gen)
    back = arch.to_candidate(arch.to_hf(native))
    record(figures={"candidate_tensors": len(native)})
    problems = state_diff(native, back)
    if problems:
        arch.fail("candidate -> HF -> candidate is not the original candidate state", problems)


def converter_declares_experts(case) -> str | None:
    rules = getattr(case.spec.converter, "rules", None)
    if rules is None:
        return ("the converter declares no rules (it is not a KeyMapConverter), so which candidate slice holds which "
                "file expert is unknown; test_expert_functions_match_file checks the experts by what they compute")
    if not any(isinstance(r, (StackExperts, FuseExperts)) for r in rules):
        return ("no StackExperts/FuseExperts rule: the file's experts are not per-expert tensors stacked by the "
                "converter; test_expert_functions_match_file checks them by what they compute")
    return None


def needs_experts_pair(case) -> str | None:
    if case.spec.probes.experts is None:
        return "Probes(experts=None): the plugin declares no way to call its experts"
    if not any(p.role == "experts" for p in case.module_pairs()):
        return "no module pair with role 'experts': declare ModulePair(ref_experts, cand_experts, role='experts')"
    return None


def declares_native_save(case) -> str | None:
    return None if case.spec.native_save is not None else (
        "ArchSpec.native_save is not set: no transformers class beyond the reference writes this arch's on-disk format")


@conformance(applies=converter_declares_experts, dtypes=ANY_DTYPE)
def test_candidate_expert_layout(arch, record):
    """Slice e of each stacked or fused candidate tensor holds the file's expert e (by fingerprint)."""
    problems = expert_layout_problems(arch.spec.converter, arch.disk_state, _cand_state(arch.candidate()))
    record(figures={"layout_problems": len(problems)})
    if problems:
        arch.fail("the candidate's stacked experts do not hold the file's experts in order", problems)


def _misread_references(arch, tmp_path):
    """{fault: reference loaded from the file as that misreading would read it}."""
    misreadings = getattr(arch.spec.converter, "misreadings", {})
    if not misreadings:
        return {}
    source = arch.save_reference(tmp_path / "original")
    prefix = getattr(arch.spec.converter, "disk_prefix", "")
    return {
        fault: load_reference(type(arch.reference()), write_checkpoint(tmp_path / f"misread{n}", misread(arch.disk_state), source),
                              prefix, ignore=arch.extra_disk_keys).to(arch.device)
        for n, (fault, misread) in enumerate(misreadings.items())
    }


def _reference_call(arch):
    """How to call the reference's experts: transformers' (hidden, indices, weights), unless the
    plugin declares reference probes (Llama 4's experts take the routed, scaled input)."""
    from moe_conformance.probing import probes_of

    probe = probes_of(arch, "ref").experts
    return probe.call if probe is not None else None


@conformance(requires=("forward", "converter", "state", "deterministic", "experts"), applies=needs_experts_pair, dtypes=ANY_DTYPE)
def test_expert_functions_match_file(arch, record, tmp_path):
    """Each candidate expert computes the file's expert of the same index: a permutation or a
    gate/up misreading inside the candidate shows up here even if both converters agree on it."""
    pairs = [p for p in arch.module_pairs() if p.role == "experts"]
    ref, cand = arch.reference(), arch.candidate()
    ref_mods, cand_mods = dict(ref.named_modules()), dict(cand.named_modules())
    pairs = [p for p in pairs if p.ref in ref_mods and p.cand in cand_mods]
    call = arch.spec.probes.experts.call
    ref_call = _reference_call(arch)
    E = arch.num_experts
    x = torch.randn(7, arch.model_config.hidden_size, generator=torch.Generator().manual_seed(arch.case_seed)).to(arch.device)
    problems, worst, misread = [], 0.0, None
    for pair in pairs:
        want = expert_outputs(ref_mods[pair.ref], x, E, ref_call).double()
        got = expert_outputs(cand_mods[pair.cand], x, E, call).double()
        scale = want.abs().max()
        for e in range(E):
            delta = (got[e] - want).abs().amax(dim=(1, 2)) / scale  # vs every file expert
            worst = max(worst, float(delta[e]))
            if delta[e] <= EXPERT_MATCH_RELATIVE:
                continue
            best = int(delta.argmin())
            if delta[best] <= EXPERT_MATCH_RELATIVE:
                problems.append(f"{pair.cand} expert {e} computes the file's expert {best} (experts permuted)")
                continue
            misread = _misread_references(arch, tmp_path) if misread is None else misread
            fault = next((fault for fault, model in misread.items()
                          if (got[e] - expert_outputs(dict(model.named_modules())[pair.ref], x, E, ref_call).double()[e]).abs().max()
                          <= EXPERT_MATCH_RELATIVE * scale), None)
            problems.append(f"{pair.cand} expert {e}: {fault}" if fault else
                            f"{pair.cand} expert {e} matches no expert of the file (relative max|delta| {float(delta[e]):.3g})")
    record(figures={"expert_max_relative_delta": worst}, thresholds={"expert_max_relative_delta": EXPERT_MATCH_RELATIVE})
    if problems:
        arch.fail("candidate experts do not compute the file's experts", problems[:8])


@conformance(dtypes=ANY_DTYPE)
def test_converted_checkpoint_reloads_into_reference(arch, record, tmp_path):
    """to_hf(candidate) written to disk loads into the reference with from_pretrained (no
    missing/unexpected keys) and reproduces the original logits exactly."""
    source = arch.save_reference(tmp_path / "original")
    exported = arch.to_hf(_cand_state(arch.candidate()))
    folder = write_checkpoint(tmp_path / "converted", exported, source)
    prefix = getattr(arch.spec.converter, "disk_prefix", "")
    reloaded = load_reference(type(arch.reference()), folder, prefix, ignore=arch.extra_disk_keys).to(arch.device)
    original = arch.reference()
    worst = 0.0
    with torch.no_grad():
        for name, batch in arch.batches.items():
            a, b = run_reference(original, batch), run_reference(reloaded, batch)
            worst = max(worst, float((a - b).abs().max()))
    record(figures={"max_abs_logit_delta": worst}, thresholds={"max_abs_logit_delta": 0.0})
    assert worst == 0.0, f"{arch.id}: the reference reloaded from the converted checkpoint changes logits by up to {worst:.3g}"


@conformance(dtypes=ANY_DTYPE)
def test_bf16_checkpoint_keeps_dtypes(arch, record, tmp_path):
    """A bf16 checkpoint written by the reference's own bf16 save_pretrained (which decides what
    stays fp32: its _keep_in_fp32_modules(_strict), e.g. the routing bias, and on transformers
    >= 5.24 the DeepSeek-V3/GLM router weight too) survives a bf16 candidate with every dtype
    and bit intact. The candidate is put in bf16 by the plugin's ``cast`` with the tensors the
    file keeps in fp32 named, so the same check is right on every transformers release."""
    source = arch.save_reference(tmp_path / "fp32")
    ref_class = type(arch.reference())
    bf16_ref = load_reference(ref_class, source, getattr(arch.spec.converter, "disk_prefix", ""), dtype=torch.bfloat16)
    disk = arch.with_extras(read_checkpoint(arch.save_reference(tmp_path / "bf16", model=bf16_ref)))
    fp32_kept = sorted(k for k, v in disk.items() if v.dtype == torch.float32)
    cand_state = arch.to_candidate(disk)
    keep = frozenset(k for k, v in cand_state.items() if v.dtype == torch.float32)
    cand = arch.spec.cast(arch.spec.candidate(copy.deepcopy(arch.config)), torch.bfloat16, keep)
    cand.load_state_dict(cand_state, strict=True)
    back = arch.to_hf(_cand_state(cand))
    record(figures={"fp32_tensors_in_bf16_checkpoint": len(fp32_kept),
                    "fp32_modules_in_bf16_checkpoint": fp32_module_suffixes(fp32_kept),
                    "reference_fp32_rules": reference_fp32_rules(ref_class)})
    problems = state_diff(disk, back)
    if problems:
        arch.fail("bf16 checkpoint -> bf16 candidate -> HF changed dtypes or bits", problems)


@conformance(subject="reference", applies=declares_native_save, dtypes=ANY_DTYPE)
def test_transformers_save_naming(arch, record, tmp_path):
    """transformers' own class for the released checkpoint should write the on-disk naming (a
    check of transformers, not of the candidate)."""
    torch.manual_seed(0)
    model = arch.spec.native_save(copy.deepcopy(arch.config))
    model.save_pretrained(tmp_path)
    prefix = getattr(arch.spec.converter, "disk_prefix", "")
    written = {k: v for k, v in read_checkpoint(tmp_path).items() if k.startswith(prefix)}
    release = {k: v for k, v in arch.disk_state.items()}
    missing = sorted(set(release) - set(written))
    unexpected = sorted(set(written) - set(release))
    record(figures={"missing": len(missing), "unexpected": len(unexpected)})
    assert not missing and not unexpected, (
        f"{arch.id}: {type(model).__name__}.save_pretrained writes {len(unexpected)} key(s) the release does not have "
        f"(e.g. {unexpected[:2]}) and lacks {len(missing)} it has (e.g. {missing[:2]})"
    )
