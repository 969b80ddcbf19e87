"""Deliberately broken RL pieces for the `rl` and `engine_parity` suites (BUGS.md #31-32).

``build(bug)`` returns a built-in arch's spec with exactly one bug planted in the RL code it
declares through ``ArchSpec.rl`` (an ``RLHooks``: the inference engine, the reward, the KL
estimator), under the name ``<arch>_<bug>``. The model itself is left intact: these are bugs of
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


def _reward_ignores_answer(text, answer):
    return rl.reverse_reward(text, text[::-1])  # the bug: scores the reference answer, not the model's


BUGS = {
    "temperature_on_logprobs": ("kimi_k25", rl.RLHooks(engine=TemperatureOnLogprobs)),
    "logprob_off_by_one": ("kimi_k25", rl.RLHooks(engine=OffByOne)),
    "stale_engine_weights": ("qwen3_moe", rl.RLHooks(engine=StaleWeights)),
    "kl_wrong_sign": ("kimi_k25", rl.RLHooks(kl_estimator=rl.KLEstimator("k3", _k3_log_ratio_flipped))),
    "kl_zero": ("kimi_k25", rl.RLHooks(kl_estimator=rl.KLEstimator("k3", _kl_always_zero))),
    "reward_ignores_answer": ("mixtral", rl.RLHooks(reward=_reward_ignores_answer)),
    "routing_differs": ("kimi_k25", rl.RLHooks(engine=BiasInBf16)),
}


def build(bug: str):
    arch, hooks = BUGS[bug]
    return dataclasses.replace(base_spec(arch).replace(rl=hooks), name=f"{arch}_{bug}")
