"""Deliberately broken RL pieces for the `rl` and `engine_parity` suites (BUGS.md #31-32, #51-52).

``build(bug)`` returns a built-in arch's spec with exactly one bug planted in the RL code it
declares through ``ArchSpec.rl`` (an ``RLHooks``: the inference engine and its weight sync, the
reward, the KL estimator, the routing replay hook), under the name ``<arch>_<bug>``. The model itself is left intact: these are bugs of
the engine and the RL loop, not of the modeling code.
"""

from __future__ import annotations

import dataclasses

import torch

from moe_conformance import engines, rl
from moe_conformance.native.model import Router
from planted import base_spec


class TemperatureOnLogprobs(engines.CandidateEngine):
    """Reports log_softmax(logits) / T: sampling is still right (exp of it is proportional to
    softmax(logits / T)), the logprobs handed to the trainer are not."""

    def log_dist(self, logits, temperature):
        return logits.float().log_softmax(-1) / temperature


class OffByOne(engines.CandidateEngine):
    """Scores token t with the distribution of position t (vLLM's prompt logprobs start with a
    None for the first token: dropping the wrong end)."""

    def align(self, logp):
        return logp[1:]


class StaleWeights(engines.CandidateEngine):
    """Never applies the weight update (keeps serving the weights it was built with)."""

    def load(self, state):
        pass


class BiasInBf16(engines.CandidateEngine):
    """The engine keeps the routers' correction bias in bf16 (a `model.to(bf16)` cast in the
    inference stack): routing flips for tokens whose top-k margin is below a bf16 step."""

    def __init__(self, case, state):
        super().__init__(case, state)
        self._round()

    def load(self, state):
        super().load(state)
        self._round()

    def _round(self):
        for m in self.model.modules():
            if isinstance(m, Router) and hasattr(m, "expert_bias"):
                m.expert_bias.copy_(m.expert_bias.to(torch.bfloat16).float())


def _k3_log_ratio_flipped(logp, ref_logp):
    log_ratio = logp - ref_logp  # the bug: k3 wants ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


def _kl_always_zero(logp, ref_logp):
    return (logp - ref_logp) * 0.0  # the bug: a KL term wired to nothing (named k3, computes 0)


def _kl_reference_shifted(logp, ref_logp):
    # the bug: the reference logprobs misaligned by one token (scored at the next position)
    log_ratio = ref_logp.roll(1, dims=-1) - logp
    return log_ratio.exp() - log_ratio - 1


def _reward_ignores_answer(text, answer):
    return rl.reverse_reward(text, text[::-1])  # the bug: scores the reference answer, not the model's


BUGS = {
    "temperature_on_logprobs": ("kimi_k25", rl.RLHooks(engine=TemperatureOnLogprobs)),
    "logprob_off_by_one": ("kimi_k25", rl.RLHooks(engine=OffByOne)),
    "stale_engine_weights": ("qwen3_moe", rl.RLHooks(engine=StaleWeights)),
    "kl_wrong_sign": ("kimi_k25", rl.RLHooks(kl_estimator=rl.KLEstimator("k3", _k3_log_ratio_flipped))),
    "kl_zero": ("kimi_k25", rl.RLHooks(kl_estimator=rl.KLEstimator("k3", _kl_always_zero))),
    "kl_reference_shifted": ("qwen3_moe", rl.RLHooks(kl_estimator=rl.KLEstimator("k3", _kl_reference_shifted))),
    "reward_ignores_answer": ("mixtral", rl.RLHooks(reward=_reward_ignores_answer)),
    "routing_differs": ("kimi_k25", rl.RLHooks(engine=BiasInBf16)),
}


def build(bug: str):
    if bug in SPEC_BUGS:
        arch, breaks = SPEC_BUGS[bug]
        return dataclasses.replace(breaks(base_spec(arch)), name=f"{arch}_{bug}")
    arch, hooks = BUGS[bug]
    return dataclasses.replace(base_spec(arch).replace(rl=hooks), name=f"{arch}_{bug}")


# ---- engine weight sync (BUGS.md #51): the engine's load() path


def _layer(key: str) -> int | None:
    from moe_conformance.training import layer_of

    return layer_of(key)


class LastLayerNotSynced(engines.CachedCandidateEngine):
    """The sync loop stops one layer short (``range(num_layers - 1)``): the last decoder layer
    keeps the weights the engine was built with."""

    def load(self, state):
        last = max(l for l in (_layer(k) for k in state) if l is not None)
        held = self.model.state_dict()
        super().load({k: (held[k] if _layer(k) == last else v) for k, v in state.items()})


class ExpertsNotSynced(engines.CachedCandidateEngine):
    """The grouped (stacked) expert tensors are never yielded to the engine (SkyRL #1471): every
    other parameter updates, the experts keep the weights the engine was built with."""

    def load(self, state):
        held = self.model.state_dict()
        super().load({k: (held[k] if ".experts." in k else v) for k, v in state.items()})


class ExpertsAccumulate(engines.CachedCandidateEngine):
    """The experts' weight loader adds into its buffers instead of copying: right when the engine
    is built (zero buffers), every later update adds the new weights onto the old."""

    def load(self, state):
        held = self.model.state_dict()
        super().load({k: (held[k] + v if ".experts." in k else v) for k, v in state.items()})


class DeltaFromFirstLoad(engines.CachedCandidateEngine):
    """Updates applied as deltas against the weights the engine was built with (a stale base),
    not the weights it holds: one update lands, the second does not."""

    def __init__(self, case, state):
        super().__init__(case, state)
        self._base = {k: v.detach().clone() for k, v in state.items()}

    def load(self, state):
        held = self.model.state_dict()
        super().load({k: (held[k] + (v - self._base[k]) if v.is_floating_point() else v) for k, v in state.items()})


# ---- routing replay (BUGS.md #52)


def _replay_on_orphans(case, model, routes):
    """The replay hooks go on a copy's routers (patched before the model was wrapped/copied:
    verl #7340), so the forward that runs never sees them."""
    import copy

    return rl.replay_routing(case, copy.deepcopy(model), routes)


def _replay_zeroed_gates(case, model, routes):
    """Replayed gates gathered from the router's post-top-k tensor: the trainer's own top-k
    scores with every other expert zeroed (ISEEKYAN/Megatron-LM #79)."""
    from contextlib import contextmanager

    from moe_conformance import replay, routing
    from moe_conformance.contract import RouterReading
    from moe_conformance.probing import forced_routing

    by_layer = replay._layer_routes(case, model, routes)
    caps = case.spec.capabilities
    oracle = routing.from_config(case.model_config, caps.router_scoring, caps.correction_bias)

    def choose(layer, natural):
        rec = by_layer[layer].reshape(-1, by_layer[layer].shape[-1])
        nat = natural.indices.reshape(rec.shape[0], -1)
        keep = (rec < 0).any(-1, keepdim=True)
        indices = torch.where(keep, nat, rec)
        scores = oracle.scores(natural.logits.reshape(rec.shape[0], -1).float())
        topk = torch.zeros_like(scores).scatter(1, nat, scores.gather(1, nat))  # the bug: post-top-k, zeroed
        weights = topk.gather(1, indices)
        if oracle.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * oracle.routed_scaling_factor
        return RouterReading(indices=indices, weights=torch.where(keep, natural.weights.reshape(weights.shape), weights))

    @contextmanager
    def ctx():
        with forced_routing(model, case, "cand", choose):
            yield

    return ctx()


BUGS.update({
    "last_layer_not_synced": ("qwen3_moe", rl.RLHooks(engine=LastLayerNotSynced)),
    "experts_not_synced": ("kimi_k25", rl.RLHooks(engine=ExpertsNotSynced)),
    "experts_accumulate_on_update": ("mixtral", rl.RLHooks(engine=ExpertsAccumulate)),
    "update_against_stale_base": ("qwen3_moe", rl.RLHooks(engine=DeltaFromFirstLoad)),
    "replay_on_orphan_routers": ("kimi_k25", rl.RLHooks(replay=_replay_on_orphans)),
    "replay_zeroed_gates": ("qwen3_moe", rl.RLHooks(replay=_replay_zeroed_gates)),
})


# ---- what vLLM loads: bugs only the vLLM checks see (a field only vLLM reads, an export path)


def _with_vllm_config(spec, **fields):
    """The arch's vLLM variant with extra config fields (saved to config.json, which transformers
    ignores and vLLM reads)."""
    from moe_conformance import engines

    name, _ = engines.vllm_variant(spec)
    base = spec.variant(name)

    def config():
        cfg = base.config()
        target = spec.model_config(cfg)
        for k, v in fields.items():
            setattr(target, k, v)
        return cfg

    return spec.replace(variants=tuple(dataclasses.replace(v, config=config) if v.name == name else v
                                       for v in spec.variants))


def _experts_stale_after_first_export(spec):
    """to_hf keeps serving the expert tensors of its first export (an export cache keyed by name,
    never invalidated): the first engine is right, no later export carries new expert weights."""
    from planted import WrappedConverter

    conv = spec.converter
    cache = {}

    def to_hf(sd):
        out = conv.to_hf(sd)
        for k, v in out.items():
            if ".experts." in k:
                out[k] = cache.setdefault(k, v.clone())
        return out

    return spec.replace(converter=WrappedConverter(conv, to_hf=to_hf))


SPEC_BUGS = {
    # a config.json whose router field says softmax: transformers' DeepseekV3 ignores it (always
    # sigmoid), vLLM's reads it (BUGS.md #46: gating metadata lost, softmax where sigmoid should run)
    "vllm_reads_softmax_scoring": ("kimi_k25", lambda s: _with_vllm_config(s, scoring_func="softmax")),
    "experts_stale_after_first_export": ("qwen3_moe", _experts_stale_after_first_export),
}
