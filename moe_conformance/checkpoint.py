"""On-disk checkpoints and the checks that compare them bit for bit.

The oracle is always the ORIGINAL file tensors (safetensors written by the reference's
``save_pretrained``), never ``model.state_dict()``, which transformers keeps in a fused
in-memory layout. Expert weights are fingerprinted (a hash of their bytes) so that a
permutation or a gate/up swap applied in both conversion directions cannot pass.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file



def fingerprint(t: torch.Tensor) -> str:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha1(raw.numpy().tobytes() + str((t.dtype, tuple(t.shape))).encode()).hexdigest()[:16]


def state_diff(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], limit: int = 8) -> list[str]:
    """Every way ``got`` differs from ``expected``: key sets (by name), dtypes, shapes, bits."""
    problems = []
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:limit])}{' ...' if len(missing) > limit else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:limit])}{' ...' if len(unexpected) > limit else ''}")
    by_fp = {fingerprint(t): k for k, t in expected.items()}
    value_problems = []
    for key in sorted(set(expected) & set(got)):
        e, g = expected[key], got[key]
        if e.dtype != g.dtype:
            value_problems.append(f"{key}: dtype {g.dtype}, file has {e.dtype}")
        elif e.shape != g.shape:
            value_problems.append(f"{key}: shape {tuple(g.shape)}, file has {tuple(e.shape)}")
        elif not torch.equal(e, g):
            other = by_fp.get(fingerprint(g))
            if other:
                value_problems.append(f"{key}: holds the file's {other}")
            elif e.is_floating_point() and any(torch.equal(e.to(lo).to(e.dtype), g) for lo in (torch.bfloat16, torch.float16)):
                lo = next(lo for lo in (torch.bfloat16, torch.float16) if torch.equal(e.to(lo).to(e.dtype), g))
                value_problems.append(f"{key}: values rounded to {str(lo).removeprefix('torch.')} (kept as {g.dtype})")
            elif torch.isfinite(g).all() and torch.count_nonzero(g) == 0:
                value_problems.append(f"{key}: exported as zeros")
            else:
                value_problems.append(f"{key}: values differ (max|delta| {float((e.double() - g.double()).abs().max()):.3g})")
    if value_problems:
        problems.append(f"{len(value_problems)} tensor(s) differ: " + "; ".join(value_problems[:limit]))
    return problems


def expert_layout_problems(converter, disk: dict[str, torch.Tensor], cand_state: dict[str, torch.Tensor], limit: int = 6) -> list[str]:
    """For converters declared with StackExperts/FuseExperts rules: slice e of every stacked or
    fused candidate tensor must hold the file's expert e (gate and up of a fused tensor each in
    its place), found by fingerprint so that a permutation or a swap is named."""
    sources = getattr(converter, "expert_sources", None)
    if sources is None:
        return []
    by_fp = {fingerprint(t): k for k, t in disk.items()}
    problems = []
    for key, stacked in cand_state.items():
        found = sources(key)
        if found is None:
            continue
        rule, templates = found
        for e in range(stacked.shape[0]):
            for n, held in rule.expert_slices(stacked, e).items():
                want = templates[n].format(e=e)
                if want in disk and not torch.equal(held, disk[want]):
                    holds = by_fp.get(fingerprint(held), "no tensor of the file")
                    part = f" ({('gate', 'up')[n]} half)" if len(templates) == 2 else ""
                    problems.append(f"candidate {key}[{e}]{part} holds {holds}, expected {want}")
    return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config_from: Path) -> Path:
    """A loadable checkpoint folder: one safetensors file plus the original config files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (config_from / name).exists():
            shutil.copy(config_from / name, folder / name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def load_reference(model_class, folder: Path, disk_prefix: str = "", ignore=(), **kwargs):
    """``from_pretrained`` of the reference class, mapping the released naming back, and
    failing (not warning) on missing, unexpected or mismatched keys. ``ignore``: on-disk keys
    the reference is known not to load (declared extras such as MTP layers)."""
    key_mapping = {f"^{re.escape(disk_prefix)}": ""} if disk_prefix else None
    model, info = model_class.from_pretrained(
        folder, key_mapping=key_mapping, output_loading_info=True, attn_implementation="eager", **kwargs
    )
    if ignore:
        expected = set(ignore) | {k.removeprefix(disk_prefix) for k in ignore}
        # the loader names a key as it reads it, or after its own fusing of per-expert keys
        # (``...experts.gate_up_proj``): an extra layer is matched by its layer prefix
        layers = {m.group(0) for k in expected if (m := re.match(r"^.*?\blayers\.\d+\.", k))}
        info = {**info, "unexpected_keys": [k for k in info.get("unexpected_keys", ())
                                            if k not in expected and not any(k.startswith(p) for p in layers)]}
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise AssertionError(f"from_pretrained({folder.name}) did not load cleanly: {bad}")
    model.config._experts_implementation = "eager"
    return model.eval()


@torch.no_grad()
def expert_outputs(experts: torch.nn.Module, x_TH: torch.Tensor, num_experts: int, call=None) -> torch.Tensor:
    """[E, T, H]: every token sent through each expert alone with weight 1, through the experts
    probe's ``call`` (default: the module's own (hidden, top_k_index, top_k_weights) interface)."""
    from .contract import call_hidden_indices_weights

    call = call or call_hidden_indices_weights
    T = x_TH.shape[0]
    weights = torch.ones(T, 1, dtype=x_TH.dtype, device=x_TH.device)
    return torch.stack([
        call(experts, x_TH, torch.full((T, 1), e, dtype=torch.long, device=x_TH.device), weights) for e in range(num_experts)
    ])


def reference_fp32_rules(model_class) -> dict[str, list[str]]:
    """What a transformers class says it keeps in fp32 when loaded in low precision: the module
    name fragments of ``_keep_in_fp32_modules`` (fp16 loads) and ``_keep_in_fp32_modules_strict``
    (fp16 and bf16), as this installed release defines them."""
    return {attr: sorted(getattr(model_class, attr, None) or [])
            for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")}


def fp32_module_suffixes(keys: list[str]) -> list[str]:
    """The distinct trailing names (``gate.weight``, ``e_score_correction_bias``) of fp32 keys,
    for a report line that reads the same for every layer count."""
    return sorted({".".join(k.split(".")[-2:]) if k.endswith((".weight", ".bias")) else k.rsplit(".", 1)[-1]
                   for k in keys})


def keeps_fp32(model_class):
    """name -> whether a low-precision load of ``model_class`` keeps that tensor in fp32: its
    ``_keep_in_fp32_modules_strict`` fragments found in the name, as transformers matches them."""
    patterns = [re.escape(m) for m in (getattr(model_class, "_keep_in_fp32_modules_strict", None) or [])]
    found = re.compile("|".join(patterns)) if patterns else None
    return lambda name: bool(found and found.search(name))
