"""Measures what the suite's probes and contract checks would meet in torchtitan 0.3.0 (fixed
build, fp32 unless said): router output, forcing a routing decision, calling the experts on given
choices, deepcopy, state-dict and checkpoint round trips, eval determinism, parameter vs state-dict
names, bf16 casting.

    TRITON_INTERPRET=1 .venv-torchtitan/bin/python examples/torchtitan/check_probes.py
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import build  # noqa: E402
import probes  # noqa: E402
from moe_conformance.case import ArchCase  # noqa: E402
from moe_conformance.contract import RouterReading, default_cast  # noqa: E402
from moe_conformance.registry import discover  # noqa: E402


def describe(x):
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}"
    return f"{type(x).__name__}(" + ", ".join(describe(t) for t in x) + ")"


def main():
    from torch.nn.attention.flex_attention import flex_attention
    from torchtitan.models.common.attention import FlexAttention
    FlexAttention._compiled_flex_attn = staticmethod(flex_attention)
    for arch in ("deepseek_v3", "qwen3_moe"):
        case = ArchCase(discover()[0][arch].load(), "faithful")
        cfg, batch = case.config, case.batches["plain"]
        ref = case.reference()
        cand = build.build(cfg)
        cand.load_state_dict(build.to_candidate(case.disk_state, cfg), strict=True)
        cand.eval()
        layer = next(i for i in range(case.num_layers) if hasattr(cand.layers[str(i)], "moe"))
        router, experts = cand.layers[str(layer)].moe.router, cand.layers[str(layer)].moe.routed_experts
        ref_gate, ref_experts = ref.model.layers[layer].mlp.gate, ref.model.layers[layer].mlp.experts
        print(f"\n## {arch} (MoE layer {layer})")

        seen = {}
        hooks = [router.register_forward_hook(lambda m, a, o: seen.__setitem__("router", o)),
                 router.gate.register_forward_hook(lambda m, a, o: seen.__setitem__("gate", o)),
                 experts.register_forward_hook(lambda m, a, o: seen.__setitem__("experts", (a, o))),
                 ref_gate.register_forward_hook(lambda m, a, o: seen.__setitem__("ref_gate", o)),
                 ref_experts.register_forward_hook(lambda m, a, o: seen.__setitem__("ref_experts", (a, o)))]
        with torch.no_grad():
            ref_logits = ref(**batch.kwargs, use_cache=False).logits
            logits = cand(**batch.kwargs)
        for h in hooks:
            h.remove()
        print("router output:", describe(seen["router"]))
        print("router.gate output (the logits, a child module):", describe(seen["gate"]))
        print("routed_experts args:", describe(seen["experts"][0]), "-> output", describe(seen["experts"][1]))
        reading = probes.read_router(seen["router"])
        ref_l, ref_w, ref_i = seen["ref_gate"]
        act = torch.sigmoid if arch == "deepseek_v3" else (lambda t: t.softmax(-1))
        print("read_router: scores == activation(reference logits): max|d| "
              f"{float((reading.scores - act(ref_l.float())).abs().max()):.2e}; router.gate output == reference "
              f"logits: max|d| {float((seen['gate'].reshape(ref_l.shape) - ref_l).abs().max()):.2e}")
        same = bool((reading.indices.sort(-1).values == ref_i.sort(-1).values).all())
        print(f"read_router: same experts as reference on every token: {same}")

        # the default (transformers-style) reader on torchtitan's output: passes the length check
        from moe_conformance.contract import read_logits_weights_indices
        wrong = read_logits_weights_indices(seen["router"])
        print("contract default reader on torchtitan's router output (no error): logits", describe(wrong.logits),
              "weights", describe(wrong.weights), "indices", describe(wrong.indices))

        # forcing: a random routing decision into torchtitan's router and into transformers' gate
        gen = torch.Generator().manual_seed(0)
        T, K, E = ref_i.shape[0], ref_i.shape[1], reading.scores.shape[-1]
        idx = torch.rand(T, E, generator=gen).argsort(-1)[:, :K]
        w = torch.rand(T, K, generator=gen) + 0.5
        forced = RouterReading(indices=idx, weights=w)
        h1 = router.register_forward_hook(lambda m, a, o: probes.force_router(o, forced))
        h2 = ref_gate.register_forward_hook(lambda m, a, o: (o[0], w.to(o[1].dtype), idx.to(o[2].dtype)))
        with torch.no_grad():
            d_forced = float((ref(**batch.kwargs, use_cache=False).logits - cand(**batch.kwargs)).abs().max())
            d_moved = float((cand(**batch.kwargs) - logits).abs().max())
        h1.remove()
        h2.remove()
        print(f"force_router (random experts and weights in both, layer {layer}): max|delta logit| ref vs torchtitan "
              f"{d_forced:.2e}; torchtitan moved by {d_moved:.3g} from its own routing")

        # experts on given choices, incl. an expert with no token and all tokens on one expert
        x = torch.randn(7, cfg.hidden_size, generator=gen)
        for what, ids in (("random", torch.rand(7, E, generator=gen).argsort(-1)[:, :K]),
                          ("all on experts 0..K-1", torch.arange(K).expand(7, K).clone())):
            ww = torch.rand(7, K, generator=gen)
            with torch.no_grad():
                out = probes.call_experts(experts, x, ids, ww)
                want = ref_experts(x, ids, ww)
            print(f"call_experts ({what}) vs transformers' experts: {describe(out)}, max|d| {float((out - want).abs().max()):.2e}")
        ids1, w1 = torch.randint(0, E, (7, 1), generator=gen), torch.ones(7, 1)
        with torch.no_grad():
            want = ref_experts(x, ids1, w1)
            raw = experts(x[None], w1[None], ids1[None], torch.bincount(ids1.reshape(-1), minlength=E))[0]
            fixed = probes.call_experts(experts, x, ids1, w1)
        print(f"K=1 (config top_k {K}): routed_experts called directly max|d| {float((raw - want).abs().max()):.3g}; "
              f"call_experts (sets token_dispatcher.top_k) max|d| {float((fixed - want).abs().max()):.2e}")
        args = seen["experts"][0]
        i2, w2 = probes.read_choice(args, {})
        (fx, fw, fi, fc), _ = probes.force_choice(args, {}, i2.flip(-1), w2.flip(-1))
        print("read_choice == router reading:", bool(torch.equal(i2, reading.indices)),
              "; force_choice recomputes counts:", bool(torch.equal(fc, args[3])))

        # contract basics
        with torch.no_grad():
            again = cand(**batch.kwargs)
            twin = copy.deepcopy(cand)
            from_copy = twin(**batch.kwargs)
        print("eval deterministic (bitwise):", bool(torch.equal(again, logits)),
              "; deepcopy gives bitwise the same logits:", bool(torch.equal(from_copy, logits)))
        cand_state = cand.state_dict()
        fresh = build.build(cfg)
        fresh.load_state_dict(cand_state, strict=True)
        with torch.no_grad():
            print("state_dict -> load_state_dict(strict) into a fresh build: bitwise same logits:",
                  bool(torch.equal(fresh.eval()(**batch.kwargs), logits)))
        disk = case.disk_state
        back = build.to_hf(build.to_candidate(disk, cfg), cfg)
        exact = set(back) == set(disk) and all(back[k].dtype == disk[k].dtype and torch.equal(back[k], disk[k]) for k in disk)
        print(f"disk -> to_candidate -> to_hf: {len(disk)} keys, bit-exact with names and dtypes: {exact}")
        again_state = build.to_candidate(build.to_hf(cand_state, cfg), cfg)
        print("candidate -> to_hf -> to_candidate bit-exact:", set(again_state) == set(cand_state)
              and all(torch.equal(again_state[k], cand_state[k]) for k in cand_state))
        params = {n for n, _ in cand.named_parameters()}
        buffers = {n for n, _ in cand.named_buffers()}
        print("state_dict keys that are not parameters:", sorted(set(cand_state) - params),
              "; non-persistent buffers:", sorted(buffers - set(cand_state))[:3], "...")
        if arch == "qwen3_moe":
            def fused(c):
                from torchtitan.models.common.config_utils import make_gqa_config
                from torchtitan.models.qwen3 import _LINEAR_INIT as INIT
                for lc in c.layers:
                    a = lc.attention
                    lc.attention = make_gqa_config(dim=a.dim, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                                                   wqkv_param_init=INIT, wo_param_init=INIT, inner_attention=a.inner_attention,
                                                   rope=a.rope, qk_norm=a.qk_norm, fuse_qkv=True)
            f = build.build(cfg, tweak=fused)
            fp = {n for n, _ in f.named_parameters()}
            fs = set(f.state_dict())
            print("fuse_qkv=True: parameters not in state_dict:", sorted(fp - fs)[:2], "...; state_dict keys not parameters:",
                  sorted(fs - fp)[:3], "...")
            sd = f.state_dict()
            try:
                {n: sd[n] for n, _ in f.named_parameters()}
            except KeyError as e:
                print("fuse_qkv=True: state_dict()[name] for name in named_parameters() -> KeyError", e)
            grads = {n: torch.zeros_like(p) for n, p in f.named_parameters()}
            lost = sorted(set(grads) - set(build.to_candidate(build.to_hf(grads, cfg), cfg)))
            print(f"fuse_qkv=True: to_hf(named_parameters()) drops {len(lost)} of {len(grads)} tensors silently: {lost[:2]} ...")
        else:
            try:
                build.to_hf({**cand_state, "layers.1.moe.unknown": torch.zeros(1)}, cfg)
            except KeyError as e:
                print("deepseek_v3 to_hf on an unknown key: KeyError", e)

        # bf16: the reference keeps the router weight and the correction bias in fp32
        keep = {n for n in cand_state if n.endswith(("moe.router.gate.weight", "moe.expert_bias_E"))}
        with torch.no_grad():
            ref16 = copy.deepcopy(ref).to(torch.bfloat16)(**batch.kwargs, use_cache=False).logits.float()
        print(f"for scale: transformers bf16 vs fp32 reference: max|d| {float((ref16 - ref_logits).abs().max()):.3g}")
        for how, fn, kept in (("default_cast, all bf16", default_cast, frozenset()),
                              ("build.cast, all bf16", build.cast, frozenset()),
                              ("build.cast, router weight + bias kept fp32", build.cast, frozenset(keep))):
            model = fn(copy.deepcopy(cand), torch.bfloat16, kept)
            cache = next(b for n, b in model.named_buffers() if n.endswith("rope.cache"))
            orig = next(b for n, b in cand.named_buffers() if n.endswith("rope.cache"))
            lost = float(orig.imag.abs().max()) if orig.is_complex() and not cache.is_complex() else 0.0
            try:
                with torch.no_grad():
                    out = model(**batch.kwargs)
                print(f"{how}: rope cache {cache.dtype} (imaginary part lost: max {lost:.3g}); logits {describe(out)}, max|d| vs fp32 reference "
                      f"{float((out.float() - ref_logits).abs().max()):.3g}")
            except Exception as e:  # noqa: BLE001
                print(f"{how}: rope cache {cache.dtype}; forward raises {type(e).__name__}: {str(e).splitlines()[0][:120]}")

        # training: backward on CPU (flex_attention has none there: the sdpa_attention fix)
        for fixes in (build.FIXES, tuple(f for f in build.FIXES if f != "sdpa_attention")):
            model = build.build(cfg, fixes)
            model.load_state_dict(cand_state)
            model.train()
            moe = model.layers[str(layer)].moe
            before = moe.tokens_per_expert_E.clone()
            try:
                model(**batch.kwargs).logsumexp(-1).mean().backward()
            except Exception as e:  # noqa: BLE001
                print(f"backward with {'flex_attention' if 'sdpa_attention' not in fixes else 'sdpa_attention'}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            w1 = moe.routed_experts.inner_experts.w1_EFD.grad
            got = w1.flatten(1).abs().sum(-1) > 0
            routed = moe.tokens_per_expert_E - before > 0
            print("backward with sdpa_attention: router.gate grad non-zero:", bool(moe.router.gate.weight.grad.abs().sum() > 0),
                  "; experts with grad == experts with tokens:", bool(torch.equal(got, routed)),
                  f"({int(routed.sum())}/{len(routed)} routed); expert_bias_E is a buffer (no grad):",
                  "expert_bias_E" not in dict(model.named_parameters()),
                  "; train-mode forward updated moe.tokens_per_expert_E:", bool(routed.any()))


if __name__ == "__main__":
    main()
