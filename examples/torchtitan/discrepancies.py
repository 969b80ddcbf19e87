"""Every fp32 discrepancy between torchtitan 0.3.0 and transformers on the tiny adversarial configs
of deepseek_v3 and qwen3_moe (every variant), measured, localized and corrected.

    TRITON_INTERPRET=1 .venv-torchtitan/bin/python examples/torchtitan/discrepancies.py [--compiled-flex] [--seeds 0,1,2]

For each (arch, variant, seed): the same on-disk checkpoint goes into the transformers reference and
into torchtitan (through torchtitan's own StateDictAdapter), and max |delta logit| over the valid
tokens of every input case is measured for

- ``stock``: torchtitan as its own builders make it from the mapped config (no fix);
- ``fixed``: every fix in build.FIXES;
- ``fixed - X``: every fix but X (X's own effect; each X that moves the logits is then localized:
  the first (reference, candidate) module pair whose outputs differ, and the routing-pinned delta,
  i.e. with the reference's expert choices and weights forced into torchtitan's routers);
- alternative mappings a torchtitan user could plausibly write (``mapping:...``).

Writes the tables to stdout (Markdown). Eager flex_attention by default (torchtitan's own compiled
FlexAttention takes ~20 s per new mask on CPU, and gives the same figures: --compiled-flex checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import build  # noqa: E402
import probes  # noqa: E402
from moe_conformance.case import ArchCase  # noqa: E402
from moe_conformance.registry import discover  # noqa: E402

VARIANTS = {"deepseek_v3": ("faithful", "yarn_mscale"), "qwen3_moe": ("faithful", "unnormalized")}
LOCALIZE_RELATIVE = 1e-4  # as moe_conformance.compare


def max_delta(ref_logits, cand_logits, batch) -> float:
    return float((ref_logits - cand_logits)[batch.valid].abs().max())


def first_tensor(out):
    return out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))


def expand(pairs, n_layers):
    return [dataclasses.replace(p, ref=p.ref.format(i=i), cand=p.cand.format(i=i))
            for p in pairs for i in (range(n_layers) if "{i}" in p.ref else [None])]


def localize(ref, cand, batch, pairs) -> str:
    """The first pair (in the reference's execution order) whose outputs differ."""
    ref_mods, cand_mods = dict(ref.named_modules()), dict(cand.named_modules())
    pairs = [p for p in pairs if p.ref in ref_mods and p.cand in cand_mods]
    outs, order, handles = {}, [], []
    for side, mods, names in (("ref", ref_mods, {p.ref for p in pairs}), ("cand", cand_mods, {p.cand for p in pairs})):
        for name in names:
            def hook(mod, args, out, key=(side, name)):
                outs[key] = out
                if key[0] == "ref":
                    order.append(key[1])
            handles.append(mods[name].register_forward_hook(hook))
    with torch.no_grad():
        ref(**batch.kwargs, use_cache=False)
        cand(**batch.kwargs)
    for h in handles:
        h.remove()
    valid = batch.valid.reshape(-1)
    B, S = batch.input_ids.shape

    def rows(t):  # [T, ...] (transformers' routers and experts) or [B, S, ...] -> valid rows [t, -1]
        return (t if t.shape[0] == B * S else t.reshape(B * S, -1)).reshape(B * S, -1)[valid]

    for name in order:
        for p in (p for p in pairs if p.ref == name):
            r, c = outs[("ref", p.ref)], outs[("cand", p.cand)]
            if p.role == "router":
                _, r_w, r_i = r
                reading = probes.read_router(c)
                r_i, r_w, c_i, c_w = r_i[valid], r_w[valid], reading.indices[valid], reading.weights[valid]
                r_sorted, r_pos = r_i.sort(-1)
                c_sorted, c_pos = c_i.sort(-1)
                flips = (r_sorted != c_sorted).any(-1)
                if flips.any():
                    t = int(flips.nonzero()[0, 0])
                    return (f"{p.ref} <-> {p.cand}: selected experts differ on {int(flips.sum())}/{len(flips)} tokens "
                            f"(token {t}: reference {r_sorted[t].tolist()}, torchtitan {c_sorted[t].tolist()})")
                dw = float((r_w.gather(-1, r_pos) - c_w.gather(-1, c_pos)).abs().max())
                if dw > LOCALIZE_RELATIVE * float(r_w.abs().max()):
                    return f"{p.ref} <-> {p.cand}: same experts, routing weights differ by max {dw:.3g}"
                continue
            r, c = rows(first_tensor(r)), rows(first_tensor(c))
            d = float((r - c).abs().max())
            if d > LOCALIZE_RELATIVE * float(r.abs().max()):
                return f"{p.ref} <-> {p.cand}: max|delta| {d:.3g} (reference max|value| {float(r.abs().max()):.3g})"
    return "no declared module pair diverges"


def routing_pinned(ref, cand, batch) -> float:
    """max|delta logit| with the reference's expert choices and weights forced into torchtitan."""
    forced, handles = {}, []
    for name, mod in ref.named_modules():
        if name.endswith("mlp.gate"):
            handles.append(mod.register_forward_hook(lambda m, a, out, n=name: forced.__setitem__(n, out)))
    with torch.no_grad():
        ref_logits = ref(**batch.kwargs, use_cache=False).logits
    for name, mod in cand.named_modules():
        if name.endswith("moe.router"):
            ref_name = "model." + name.replace("moe.router", "mlp.gate")
            reading = lambda out: probes.RouterReading(indices=out[2], weights=out[1])  # noqa: E731
            handles.append(mod.register_forward_hook(
                lambda m, a, out, n=ref_name: probes.force_router(out, reading(forced[n]))))
    with torch.no_grad():
        cand_logits = cand(**batch.kwargs)
    for h in handles:
        h.remove()
    return max_delta(ref_logits, cand_logits, batch)


class Variant:
    def __init__(self, arch, variant, seed):
        self.arch = arch
        self.case = ArchCase(discover()[0][arch].load(), variant, seed=seed)
        self.ref = self.case.reference()
        self.state = self.case.disk_state
        self.errors = {}
        with torch.no_grad():
            self.ref_logits = {n: self.ref(**b.kwargs, use_cache=False).logits for n, b in self.case.batches.items()}

    def candidate(self, fixes, tweak=None):
        model = build.build(self.case.config, fixes, tweak=tweak)
        model.load_state_dict(build.to_candidate(self.state, self.case.config), strict=True)
        return model.eval()

    def deltas(self, model, forward=None) -> dict[str, float]:
        out = {}
        for name, batch in self.case.batches.items():
            with torch.no_grad():
                try:
                    logits = forward(model, batch) if forward else model(**batch.kwargs)
                    out[name] = max_delta(self.ref_logits[name], logits, batch)
                except Exception as e:  # noqa: BLE001  (a case that cannot be expressed)
                    out[name] = f"{type(e).__name__}"
                    self.errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return out


def titan_native_masks(model, batch):
    """torchtitan's own convention: positions in, model.get_attention_masks(positions) (documents
    restart at position 0), no attention mask."""
    B, S = batch.input_ids.shape
    positions = batch.position_ids if batch.position_ids is not None else torch.arange(S).expand(B, S)
    plain_forward = type(model).__mro__[2].forward  # the torchtitan class under ContractForward
    return plain_forward(model, batch.input_ids, positions, model.get_attention_masks(positions))


def alternative_mappings(arch, config):
    rp = config.rope_parameters
    if arch == "deepseek_v3" and rp.get("mscale") != rp.get("mscale_all_dim"):
        def mscale_from_mscale(cfg):
            for layer in cfg.layers:
                layer.attention.mscale = rp["mscale"]
        yield "mapping: torchtitan mscale <- HF mscale (not mscale_all_dim)", mscale_from_mscale
    if arch == "qwen3_moe":
        def fused(cfg):
            from torchtitan.models.common.config_utils import make_gqa_config
            from torchtitan.models.qwen3 import _LINEAR_INIT as INIT
            for layer in cfg.layers:
                a = layer.attention
                layer.attention = make_gqa_config(
                    dim=a.dim, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, wqkv_param_init=INIT,
                    wo_param_init=INIT, inner_attention=a.inner_attention, rope=a.rope, qk_norm=a.qk_norm, fuse_qkv=True)
        yield "mapping: fuse_qkv=True (torchtitan's registry default)", fused


def fmt(d):
    return " | ".join(f"{v:.2e}" if isinstance(v, float) else v for v in d.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compiled-flex", action="store_true", help="torchtitan's compiled FlexAttention (slow on CPU)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--arch", default="deepseek_v3,qwen3_moe")
    args = ap.parse_args()
    import subprocess

    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "moe_conformance", "archs"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    print(f"# torchtitan 0.3.0 vs transformers: max|delta logit| (fp32, valid tokens)\n\n`discrepancies.py --seeds "
          f"{args.seeds}{' --compiled-flex' if args.compiled_flex else ''}`; tiny configs, weights and inputs from "
          f"moe_conformance at {head}{' + uncommitted changes' if dirty else ''}.")
    if not args.compiled_flex:
        from torch.nn.attention.flex_attention import flex_attention
        from torchtitan.models.common.attention import FlexAttention
        FlexAttention._compiled_flex_attn = staticmethod(flex_attention)
    for arch in args.arch.split(","):
        for variant in VARIANTS[arch]:
            for seed in map(int, args.seeds.split(",")):
                t0 = time.time()
                v = Variant(arch, variant, seed)
                cases = list(v.case.batches)
                print(f"\n### {arch} / {variant} (seed {seed})\n")
                print("| build | " + " | ".join(cases) + " |\n|---|" + "---|" * len(cases))
                full = v.deltas(v.candidate(build.FIXES))
                print(f"| stock (no fix) | {fmt(v.deltas(v.candidate(())))} |")
                print(f"| fixed | {fmt(full)} |")
                found = []
                for fix in build.FIXES:
                    fixes = tuple(f for f in build.FIXES if f != fix)
                    model = v.candidate(fixes)
                    d = v.deltas(model)
                    print(f"| fixed - {fix} | {fmt(d)} |")
                    if max(d.values()) > 10 * max(full.values()):
                        worst = max(d, key=d.get)
                        found.append((fix, worst, d[worst], localize(v.ref, model, v.case.batches[worst], expand(
                            probes.PAIRS[arch], v.case.num_layers)), routing_pinned(v.ref, model, v.case.batches[worst])))
                for name, tweak in alternative_mappings(arch, v.case.config):
                    model = v.candidate(build.FIXES, tweak)
                    d = v.deltas(model)
                    print(f"| {name} | {fmt(d)} |")
                    if max(d.values()) > 10 * max(full.values()):
                        worst = max(d, key=d.get)
                        found.append((name, worst, d[worst], localize(v.ref, model, v.case.batches[worst], expand(
                            probes.PAIRS[arch], v.case.num_layers)), routing_pinned(v.ref, model, v.case.batches[worst])))
                print(f"| fixed, torchtitan's own masks from positions | {fmt(v.deltas(v.candidate(build.FIXES), titan_native_masks))} |")
                native = v.case.candidate()
                print(f"| for scale: the native candidate | {fmt(v.deltas(native, lambda m, b: getattr(m(**b.kwargs), 'logits', m(**b.kwargs))))} |")
                ref64 = v.case.reference().double()
                print(f"| for scale: reference fp64 (not fp32) | {fmt(v.deltas(ref64, lambda m, b: m(**b.kwargs, use_cache=False).logits.float()))} |")
                for name, err in v.errors.items():
                    print(f"\n{name}: {err}")
                print()
                for fix, worst, d, where, pinned in found:
                    print(f"- without `{fix}`: worst on {worst} ({d:.3g}); first divergence: {where}; "
                          f"routing-pinned: {pinned:.3g}")
                print(f"\n({time.time() - t0:.0f} s)")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
