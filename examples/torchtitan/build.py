"""torchtitan 0.3.0's DeepSeek-V3 and Qwen3-MoE as moe-conformance candidates.

- ``titan_config(hf_config)``: the transformers config mapped onto torchtitan's own layer builders
  (the ones its model registry uses), field by field;
- ``build(hf_config)``: that model on the meta device, ``to_empty`` on CPU, ``init_states``, with
  the contract's forward (``input_ids, attention_mask, position_ids`` by keyword, logits out);
- ``to_candidate(hf_disk_state, config)`` / ``to_hf(cand_state, config)``: torchtitan's own
  ``StateDictAdapter``; its HF side is already the on-disk per-expert format, so no renaming.

``FIXES`` are the corrections that make torchtitan compute what transformers computes (measured
by discrepancies.py: ``fixes=()``, every fix, and every fix but one):

- ``eps``: torchtitan's DeepSeek-V3 builders leave every RMSNorm at nn.RMSNorm's eps 1e-5;
  transformers uses ``rms_norm_eps`` (and 1e-6 for the q_a/kv_a latent norms, hard-coded).
- ``fp32_experts``: ``GroupedExperts.forward`` casts tokens and expert weights to bf16, always.
- ``yarn_attention_factor``: transformers multiplies RoPE cos/sin by
  mscale(factor, mscale) / mscale(factor, mscale_all_dim); torchtitan's RoPE has no such factor.
- ``route_norm``: torchtitan's Qwen3-MoE builder hard-codes ``route_norm=True``, whatever
  ``norm_topk_prob`` says.
- ``masks``: torchtitan's attention takes a flex ``BlockMask`` and nothing else; the forward
  builds one from ``attention_mask`` (key padding) and ``position_ids`` (documents restart at 0,
  only without an attention mask, as transformers does). Without it: causal only.
- ``sdpa_attention``: not a numerical difference: ``flex_attention`` has no backward on CPU (torch
  2.13, compiled or not), so on CPU the same BlockMask is evaluated densely and run through
  ``F.scaled_dot_product_attention``; without it the candidate cannot train on CPU.

``cast(model, dtype, keep_fp32)`` is the ``ArchSpec.cast`` hook: ``model.to(bf16)`` also turns
ComplexRoPE's complex64 cache into bf16 (imaginary part dropped), so the RoPE caches are recomputed.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import and_masks, create_block_mask, create_mask
from torchtitan.models.common import ComplexRoPE, CosSinRoPE, Embedding, Linear
from torchtitan.models.common.attention import FlexAttention, get_causal_mask_mod, get_document_mask_mod
from torchtitan.models.common.moe import GroupedExperts
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.models.common.rope import RoPE
from torchtitan.models.deepseek_v3 import _EMBEDDING_INIT, _NORM_INIT, _build_dsv3_layers, _output_linear_init
from torchtitan.models.deepseek_v3.model import DeepSeekV3Model
from torchtitan.models.deepseek_v3.state_dict_adapter import DeepSeekV3StateDictAdapter
from torchtitan.models.qwen3 import _build_qwen3_moe_layers, _qwen3_norm
from torchtitan.models.qwen3 import _EMBEDDING_INIT as _Q_EMBEDDING_INIT
from torchtitan.models.qwen3 import _LINEAR_INIT as _Q_LINEAR_INIT
from torchtitan.models.qwen3.model import Qwen3Model
from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

FIXES = ("eps", "fp32_experts", "yarn_attention_factor", "route_norm", "masks", "sdpa_attention")


def _mscale(factor: float, mscale: float) -> float:  # transformers' yarn_get_mscale
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---- config mapping: transformers config -> torchtitan's dataclasses (no glue counted here)

def deepseek_v3_config(c, fixes=FIXES) -> DeepSeekV3Model.Config:
    rp = c.rope_parameters
    yarn = {}
    if rp.get("rope_type") == "yarn":
        yarn = dict(scaling="yarn", rope_factor=rp["factor"], beta_fast=rp.get("beta_fast") or 32,
                    beta_slow=rp.get("beta_slow") or 1, original_seq_len=rp["original_max_position_embeddings"],
                    truncate=rp.get("truncate", True))
    rope = ComplexRoPE.Config(dim=c.qk_rope_head_dim, max_seq_len=c.max_position_embeddings, theta=rp["rope_theta"], **yarn)
    layers = _build_dsv3_layers(
        n_layers=c.num_hidden_layers, n_dense_layers=c.first_k_dense_replace, dim=c.hidden_size,
        n_heads=c.num_attention_heads, q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        # torchtitan's `mscale` is transformers' `mscale_all_dim` (softmax scale *= mscale(f, .)^2)
        mscale=rp.get("mscale_all_dim") or 0.0,
        dense_hidden_dim=c.intermediate_size, moe_hidden_dim=c.moe_intermediate_size,
        num_experts=c.n_routed_experts, num_shared_experts=c.n_shared_experts, router_top_k=c.num_experts_per_tok,
        router_score_func="sigmoid", router_num_expert_groups=c.n_group, router_num_limited_groups=c.topk_group,
        router_route_scale=c.routed_scaling_factor, router_route_norm=c.norm_topk_prob,
        attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None, rope=rope)
    cfg = DeepSeekV3Model.Config(
        vocab_size=c.vocab_size, dim=c.hidden_size, layers=layers, enable_weight_tying=c.tie_word_embeddings,
        tok_embeddings=Embedding.Config(num_embeddings=c.vocab_size, embedding_dim=c.hidden_size, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=c.hidden_size, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=c.hidden_size, out_features=c.vocab_size, param_init=_output_linear_init(c.hidden_size)))
    if "eps" in fixes:
        for fqn, norm, _, _ in cfg.traverse(RMSNorm.Config):
            norm.eps = 1e-6 if fqn.endswith(("q_norm", "kv_norm")) else c.rms_norm_eps  # DeepseekV3RMSNorm's default
    if "yarn_attention_factor" in fixes and yarn:
        factor = rp.get("attention_factor") or (
            _mscale(rp["factor"], rp["mscale"]) / _mscale(rp["factor"], rp["mscale_all_dim"])
            if rp.get("mscale") and rp.get("mscale_all_dim") else _mscale(rp["factor"], 1.0))
        for layer in layers:
            layer.attention.rope = ScaledComplexRoPE.Config(**_fields(layer.attention.rope), attention_factor=factor)
    return cfg


def qwen3_moe_config(c, fixes=FIXES) -> Qwen3Model.Config:
    assert not c.mlp_only_layers and c.decoder_sparse_step == 1 and not c.use_sliding_window, "not mapped"
    rope = CosSinRoPE.Config(dim=c.head_dim, max_seq_len=c.max_position_embeddings, theta=c.rope_parameters["rope_theta"])
    layers = _build_qwen3_moe_layers(
        n_layers=c.num_hidden_layers, dim=c.hidden_size, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, moe_hidden_dim=c.moe_intermediate_size,
        num_experts=c.num_experts, top_k=c.num_experts_per_tok, fuse_qkv=False,  # README: wqkv vs wq/wk/wv
        attn_backend="flex", moe_comm_backend="standard", rope=rope)
    for layer in layers:
        layer.moe.load_balance_coeff = None  # no expert_bias_E: transformers has none, the adapter maps none
        if "route_norm" in fixes:
            layer.moe.router.route_norm = c.norm_topk_prob
    cfg = Qwen3Model.Config(
        vocab_size=c.vocab_size, dim=c.hidden_size, layers=layers, enable_weight_tying=c.tie_word_embeddings,
        norm=_qwen3_norm(c.hidden_size),
        tok_embeddings=Embedding.Config(num_embeddings=c.vocab_size, embedding_dim=c.hidden_size, param_init=_Q_EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=c.hidden_size, out_features=c.vocab_size, param_init=_Q_LINEAR_INIT))
    if "eps" in fixes:  # torchtitan's Qwen3 builders hard-code 1e-6 (the tiny config's value too)
        for _, norm, _, _ in cfg.traverse(RMSNorm.Config):
            norm.eps = c.rms_norm_eps
    return cfg


def titan_config(hf_config, fixes=FIXES):
    return {"deepseek_v3": deepseek_v3_config, "qwen3_moe": qwen3_moe_config}[hf_config.model_type](hf_config, fixes)


def _fields(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


# ---- glue (counted): corrections, the contract forward, building, converters

class ScaledComplexRoPE(ComplexRoPE):  # fix "yarn_attention_factor": |cis| = attention_factor
    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(ComplexRoPE.Config):
        attention_factor: float = 1.0

    def _precompute_cache(self):
        return ComplexRoPE._precompute_cache(self) * self.config.attention_factor


class GroupedExpertsFP32(GroupedExperts):  # fix "fp32_experts": forward without the bf16 casts
    def forward(self, x_RD, num_tokens_per_expert_E):
        offs = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        mm = lambda a, w: self._grouped_mm(A=a, B_t=w.transpose(-2, -1), offs=offs)  # noqa: E731
        return mm(F.silu(mm(x_RD, self.w1_EFD)) * mm(x_RD, self.w3_EFD), self.w2_EDF)


class SDPAFromBlockMask(FlexAttention):  # fix "sdpa_attention": on CPU, the BlockMask's mask_mod, dense
    def forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks, scale=None, enable_gqa=False, **kwargs):
        if q_BLNH.device.type != "cpu":
            return super().forward(q_BLNH, k_BLNH, v_BLNH, attention_masks=attention_masks, scale=scale, enable_gqa=enable_gqa)
        B, L = q_BLNH.shape[:2]
        # | eye: a fully masked (padding) query row attends to itself instead of giving NaN
        mask = create_mask(attention_masks.mask_mod, B, 1, L, L, device=q_BLNH.device) | torch.eye(L, dtype=torch.bool, device=q_BLNH.device)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH)),
                                             attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)


class ContractForward:  # mixed in front of the torchtitan model class: names and state dict unchanged
    masks = True

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        B, S = input_ids.shape
        mods = [get_causal_mask_mod()]
        if self.masks and attention_mask is not None:
            valid = attention_mask.bool()
            mods.append(lambda b, h, q, kv: valid[b, kv])
        elif self.masks and position_ids is not None:
            mods.append(get_document_mask_mod(position_ids))
        mask = create_block_mask(and_masks(*mods), B, None, S, S, device=input_ids.device)
        return super().forward(input_ids, position_ids, mask)


def build(hf_config, fixes=FIXES, tweak=None):
    cfg = titan_config(hf_config, fixes)
    if tweak is not None:  # discrepancies.py: an alternative mapping, applied to torchtitan's config
        tweak(cfg)
    cls = type(f"{cfg._owner.__name__}Candidate", (ContractForward, cfg._owner), {"masks": "masks" in fixes})
    device = torch.get_default_device()  # meta under the dry run: stays there, nothing allocated
    with torch.device("meta"):
        model = cls(cfg)
    if device.type != "meta":
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_states()
    swaps = {GroupedExperts: GroupedExpertsFP32 if "fp32_experts" in fixes else None,
             FlexAttention: SDPAFromBlockMask if "sdpa_attention" in fixes else None}
    for m in model.modules():
        m.__class__ = swaps.get(type(m)) or type(m)
    return model


def cast(model, dtype, keep_fp32=frozenset()):
    from moe_conformance.contract import default_cast

    model = default_cast(model, dtype, keep_fp32)
    for m in model.modules():
        if isinstance(m, RoPE) and m.cache.device.type != "meta":
            m.cache = m._precompute_cache().to(m.cache.device)
    return model


ADAPTERS = {"deepseek_v3": DeepSeekV3StateDictAdapter, "qwen3_moe": Qwen3StateDictAdapter}


def _is_mtp(key: str, config) -> bool:  # model.layers.N.* with N >= num_hidden_layers
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= config.num_hidden_layers


def to_candidate(hf_state, config):
    # torchtitan 0.3.0's DeepSeek-V3 has no MTP module, and its adapter raises KeyError on the MTP
    # layers' keys (model.layers.{N}.embed_tokens.weight): the glue leaves them out, so what
    # torchtitan exports has no MTP layers (a strict expected failure of the plugin)
    kept = {k: v for k, v in hf_state.items() if not _is_mtp(k, config)}
    return ADAPTERS[config.model_type](titan_config(config), None).from_hf(kept)


def to_hf(cand_state, config):
    return ADAPTERS[config.model_type](titan_config(config), None).to_hf(cand_state)


__all__ = ["FIXES", "build", "cast", "titan_config", "to_candidate", "to_hf"]
