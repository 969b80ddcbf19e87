"""What the conformance suite needs to read and drive torchtitan 0.3.0's MoE internals, written
against moe_conformance.contract.

torchtitan's shapes, measured (DeepSeek-V3 tiny config, B=2, L=20, E=12, K=3):

- ``layers.N.moe.router`` (TokenChoiceTopKRouter) returns ``(top_scores [B,L,K] fp32, selected_experts
  [B,L,K] int64, scores [B,L,E] fp32)``: the combine weights as applied (renormalized, routed
  scaling in), the chosen experts, and the *post-activation* scores (sigmoid or softmax, without the
  selection bias). No pre-activation logits. 3-D, not [T, .]. Forcing works on its output: MoE.forward
  derives the per-expert token counts from the returned expert ids.
- ``layers.N.moe.routed_experts`` (RoutedExperts) is called as ``(x [B,L,D], top_scores [B,L,K],
  expert_ids [B,L,K], tokens_per_expert [E] int64)``: weights before indices, plus counts that must
  agree with the ids, and K must be the config's top_k (``token_dispatcher.top_k``, baked in at
  build time: another K computes wrong tokens without an error). Its ``inner_experts`` (GroupedExperts) takes already-permuted tokens and counts
  only, so it is not the module to probe.
"""

from __future__ import annotations

import torch

from moe_conformance.contract import ExpertsProbe, ModulePair, Probes, RouterProbe, RouterReading


def read_router(output) -> RouterReading:
    scores_BLK, ids_BLK, probs_BLE = output
    K, E = ids_BLK.shape[-1], probs_BLE.shape[-1]
    return RouterReading(indices=ids_BLK.reshape(-1, K), weights=scores_BLK.reshape(-1, K), scores=probs_BLE.reshape(-1, E))


def force_router(output, forced: RouterReading):  # contiguous: the dispatcher .view()s them
    scores_BLK, ids_BLK, probs_BLE = output
    return (forced.weights.to(scores_BLK.dtype).reshape(scores_BLK.shape).contiguous(),
            forced.indices.to(ids_BLK.dtype).reshape(ids_BLK.shape).contiguous(), probs_BLE)


def _counts(routed_experts, indices) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1), minlength=routed_experts.inner_experts.num_experts)


def call_experts(routed_experts, x_TH, indices_TK, weights_TK):
    """The dispatcher maps sorted slots back to tokens by ``slot // top_k`` with the top_k of the
    config: any other K silently mixes tokens up, so it is set to this call's K for the call."""
    indices_TK, weights_TK = indices_TK.contiguous(), weights_TK.contiguous()
    dispatcher, top_k = routed_experts.token_dispatcher, routed_experts.token_dispatcher.top_k
    dispatcher.top_k = indices_TK.shape[-1]
    try:
        return routed_experts(x_TH[None], weights_TK[None], indices_TK[None], _counts(routed_experts, indices_TK))[0]
    finally:
        dispatcher.top_k = top_k


def read_choice(args, kwargs):
    x_BLD, scores_BLK, ids_BLK, _ = args
    return ids_BLK.reshape(-1, ids_BLK.shape[-1]), scores_BLK.reshape(-1, scores_BLK.shape[-1])


def force_choice(args, kwargs, indices, weights):
    x_BLD, scores_BLK, ids_BLK, counts_E = args
    ids = indices.to(ids_BLK.dtype).reshape(ids_BLK.shape).contiguous()
    counts = torch.bincount(ids.reshape(-1), minlength=counts_E.numel()).to(counts_E.dtype)
    return (x_BLD, weights.to(scores_BLK.dtype).reshape(scores_BLK.shape).contiguous(), ids, counts), kwargs


# the router's own output carries scores, not logits: its child `gate` (a Linear) computes them
ROUTER = RouterProbe(read=read_router, force=force_router, logits_from="gate")
EXPERTS = ExpertsProbe(call=call_experts, read_choice=read_choice, force_choice=force_choice)

_COMMON = (
    ModulePair("model.embed_tokens", "tok_embeddings"),
    ModulePair("model.layers.{i}.input_layernorm", "layers.{i}.attention_norm"),
    ModulePair("model.layers.{i}.self_attn", "layers.{i}.attention"),
    ModulePair("model.layers.{i}.post_attention_layernorm", "layers.{i}.ffn_norm"),
    ModulePair("model.layers.{i}.mlp.gate", "layers.{i}.moe.router", "router"),
    ModulePair("model.layers.{i}.mlp.experts", "layers.{i}.moe.routed_experts", "experts"),
    ModulePair("model.layers.{i}.mlp", "layers.{i}.moe"),
    ModulePair("model.layers.{i}.mlp", "layers.{i}.feed_forward"),  # dense layers
    ModulePair("model.layers.{i}", "layers.{i}"),
    ModulePair("model.norm", "norm"),
    ModulePair("lm_head", "lm_head"),
)
PAIRS = {
    "deepseek_v3": _COMMON + (
        ModulePair("model.layers.{i}.self_attn.q_a_layernorm", "layers.{i}.attention.q_norm"),
        ModulePair("model.layers.{i}.self_attn.kv_a_layernorm", "layers.{i}.attention.kv_norm"),
        ModulePair("model.layers.{i}.mlp.shared_experts", "layers.{i}.moe.shared_experts"),
    ),
    "qwen3_moe": _COMMON + (
        ModulePair("model.layers.{i}.self_attn.q_norm", "layers.{i}.attention.q_norm"),
        ModulePair("model.layers.{i}.self_attn.k_norm", "layers.{i}.attention.k_norm"),
    ),
}


def probes(arch: str) -> Probes:
    return Probes(pairs=PAIRS[arch], router=ROUTER, experts=EXPERTS)
