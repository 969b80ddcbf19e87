"""Named tolerance profiles keyed by (check, dtype), each from a measured noise floor.

How the floors were measured: ``python benchmarks/noise_floor.py`` (see its header), on the
2-core x86-64 CPU machine, over 5 seeds x every built-in arch variant x every input case:
the larger of |fp32 reference - fp64 reference| and |fp32 candidate - fp64 reference|, with
the fp64 reference scored per row with padding stripped (FACTS.md: padded rows turn NaN in
fp64 eager attention). benchmarks/results/noise_floor.md holds the last table.

The gate is the floor times a margin; planted bugs must exceed the gate by >= 10x (the
project's own tests assert that ratio for every planted bug).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Gate:
    limit: float
    at_least: bool = False  # True: the figure must be >= limit (agreement); else <= limit

    def violated_by(self, value: float) -> bool:
        return value < self.limit if self.at_least else not value <= self.limit  # NaN violates


@dataclass(frozen=True)
class Profile:
    gates: Mapping[str, Gate]
    why: str

    def with_overrides(self, check: str, overrides: Mapping[str, float]) -> Profile:
        gates = dict(self.gates)
        for key, value in overrides.items():
            name, _, figure = key.partition(".")
            if name == check and figure in gates:
                gates[figure] = Gate(value, gates[figure].at_least)
        return Profile(gates, self.why + (" (arch overrides applied)" if gates != dict(self.gates) else ""))

    def violations(self, figures: Mapping[str, float]) -> list[str]:
        out = []
        for name, gate in self.gates.items():
            if name in figures and gate.violated_by(figures[name]):
                op = ">=" if gate.at_least else "<="
                out.append(f"{name} = {figures[name]:.3g} (gate: {op} {gate.limit:.3g})")
        return out

    def thresholds(self) -> dict[str, float]:
        return {name: gate.limit for name, gate in self.gates.items()}


PROFILES: dict[tuple[str, str], Profile] = {
    ("logit_parity", "float32"): Profile(
        gates={
            # floor: max|fp32 - fp64| 3.8e-5 (logits std ~4; candidate vs reference 2.5e-5);
            # gate 13x the floor
            "max_abs_logit_delta": Gate(5e-4),
            # floor: KL mean 4.8e-12, max 3.8e-11. KL is quadratic in the logit delta, so the
            # same 13x margin on logits is ~170x here: gates 1e-9 and 1e-8.
            "kl_mean": Gate(1e-9),
            "kl_max": Gate(1e-8),
            # top-1 must agree wherever the reference's top-2 margin exceeds 1e-3
            "top1_agreement": Gate(1.0, at_least=True),
        },
        why="fp32 semantic parity: gates ~10x the measured fp32-vs-fp64 floor (benchmarks/noise_floor.py)",
    ),
    # Floors from `python benchmarks/noise_floor.py --seeds 3 --dtype bfloat16` (every built-in arch
    # variant x 3 seeds, 2-core CPU: benchmarks/results/noise_floor_bf16.md). Both models in bf16
    # (what the reference keeps in fp32 kept there), weights at production scale (tiny.PRODUCTION_SCALE):
    # bf16 vs fp64 moves logits by up to 0.39 (gpt_oss; most archs 0.01-0.1), so logit deltas
    # are reported, not gated tightly; what separates a bf16 bug from bf16 rounding is routing.
    ("logit_parity", "bfloat16"): Profile(
        gates={
            # floor: routing decisions differing between a correct candidate and the reference,
            # both bf16: <= 2.5% of (token, layer) (deepseek_v2 and hunyuan_v1_moe 4.4%: their
            # plugins hold them to 10%); gate 5% (2x). A bf16-rounded routing bias flips 51% on
            # kimi_k25 (10x the gate), an ignored bias 96%.
            "routing_flip_rate": Gate(0.05),
            # floor KL mean 1.7e-4 (gpt_oss; most archs < 2e-6), max 5.6e-3: gates 5e-4 and 5e-2
            # (3x and 9x), a sanity bound on the distributions beside the routing gate
            "kl_mean": Gate(5e-4),
            "kl_max": Gate(5e-2),
            # floor: top-1 agreement with fp64 >= 0.91 where the top-2 margin is clear; gate 0.85
            "top1_agreement": Gate(0.85, at_least=True),
            # floor 0.39 (gpt_oss): reported against a loose bound only
            "max_abs_logit_delta": Gate(1.0),
        },
        why="bf16 production profile: routing decisions gated at 2x the measured bf16 floor, distributions at 3-9x",
    ),
    ("kernels_in_reference", "float32"): Profile(
        gates={
            # the kernels inside transformers' model vs its eager experts, fp32 (Triton
            # interpreter on CPU): floor 6.7e-6 on logits, 1.3e-6 relative on gradients
            "max_abs_logit_delta": Gate(5e-4),
            "max_grad_relative_delta": Gate(2e-5),
        },
        why="same math, different summation order: gates >= 15x the measured floor",
    ),
    # Floors from `python benchmarks/training_noise_floor.py --seeds 5` (every built-in arch variant
    # x 5 seeds, 2-core CPU, one thread): benchmarks/results/training_noise_floor.md.
    ("router_grad", "float32"): Profile(
        gates={
            # floor: max|g_cand - g_ref| / max|g_ref| per group, fp32 candidate vs fp32 reference
            # after conversion to the on-disk naming: 3.2e-6 (attention 2.5e-6, router 3.1e-6,
            # experts 3.2e-6, shared 3.0e-6, norms 2.6e-6, embeddings 3.0e-6, dense 2.4e-6);
            # fp32 vs fp64 reference 7.2e-6 where fp64 routes alike. Gate 1e-4: 14x the fp64
            # floor, 30x the direct one. A detached router or untrained expert gives 1.0.
            **{f"grad_rel_delta.{g}": Gate(1e-4) for g in ("attention", "router", "experts", "shared", "norms",
                                                           "embeddings", "dense", "other")},
            # floor: candidate training code (fp32) vs the fp64 formula on the reference router's
            # logits, relative: aux 2.1e-7, z 1.6e-7. Gate 1e-5 (~50x). Counting padding moves the
            # aux loss by ~1e-2 relative; softmax of softmax by ~0.3.
            "aux_rel_delta": Gate(1e-5),
            "z_rel_delta": Gate(1e-5),
            "aux_logits_rel_delta": Gate(1e-5),
            "z_logits_rel_delta": Gate(1e-5),
            # imbalance after / before 12 bias updates from a skewed start: worst 0.72 (best 0.38);
            # an update that does nothing stays at 1.0, a reversed sign goes above it. Gate 0.85.
            "balance_ratio": Gate(0.85),
        },
        why="fp32 gradient/loss parity: gates 14-50x the measured floors (benchmarks/training_noise_floor.py)",
    ),
    ("router_grad", "bfloat16"): Profile(
        gates={
            # floor (benchmarks/results/training_noise_floor_bf16.md, 108 runs): both models in
            # bf16, the tokens the candidate routes differently pinned to the reference's experts
            # (up to 148 of ~220 on minimax_m2, whose reference keeps its bias in bf16; 0-8
            # elsewhere): worst 0.036 router (gpt_oss), 0.018 elsewhere (embeddings). Unpinned it
            # is 0.78. Gates 0.1 router, 0.05 the rest (2.8x); a halved router gradient is 0.5, a
            # detached one 1.0.
            **{f"grad_rel_delta.{g}": Gate(5e-2) for g in ("attention", "experts", "shared", "norms",
                                                           "embeddings", "dense", "other")},
            "grad_rel_delta.router": Gate(1e-1),
            # the training code vs the fp64 formula on the candidate's own (bf16-model) logits:
            # worst aux 2.1e-7, z 1.8e-7; gate 1e-5 (48x). Computed in bf16 (no upcast): 4e-4 to 1.4e-3.
            "aux_rel_delta": Gate(1e-5),
            "z_rel_delta": Gate(1e-5),
            # the formula on the candidate's logits vs on the reference's (and the team's aux vs
            # the reference model's own): worst 6.9e-4 (3.1e-3 vs gpt_oss' own); gate 1e-2.
            # Router logits that are probabilities move the aux loss by ~0.3.
            "aux_logits_rel_delta": Gate(1e-2),
            # worst 3.6e-5; gate 1e-3 (28x)
            "z_logits_rel_delta": Gate(1e-3),
            # imbalance after / before 24 bias updates from the skewed start, at a rate of a quarter
            # of the router scores' spread (production-scale weights: 0.007-0.028): worst 0.54
            # (ernie4_5_moe; 51 runs); gate 0.75. An update that does nothing stays at 1.0, a
            # reversed sign goes above it. At fp32's fixed 0.05 the same runs oscillate (up to 1.0).
            "balance_ratio": Gate(0.75),
        },
        why="bf16 gradient parity with the reference's routing pinned, and loss definitions on the candidate's bf16 logits: gates 2.8-48x the measured floors",
    ),
    ("sft", "float32"): Profile(
        gates={
            # mean loss of the last 4 of 24 steps / step-0 loss, worst over seeds: 0.64 (mixtral
            # sliding; most archs 0.38-0.57). Gate 0.75. gpt_oss, whose clamp-saturating expert
            # init slows learning (0.80-0.89), overrides it in its plugin.
            "loss_ratio": Gate(0.75),
            # |loss_cand - loss_ref| at step 0 and after the first update: <= 1.2e-5 in 89 of 90
            # runs, 9.0e-3 in one (kimi_k25 grouped_yarn, seed 4: Adam's first, sign-like step
            # amplifies float noise). Gate 2e-2.
            "loss_delta_early": Gate(2e-2),
            # over all 24 steps routing flips from float noise compound (the sign bias update and
            # Adam amplify them): worst 0.58 (same run; next 0.23, most runs < 1e-4). Gate 1.0.
            "loss_delta_max": Gate(1.0),
            # the LR applied vs the schedule: exact in practice (0); gate for float formatting only
            "lr_rel_delta": Gate(1e-6),
            # each bias update as stored vs bias + rate * sign(mean - load) in fp32: floor 0 (the
            # same fp32 ops); gate 1e-6, 2 ulps at |bias| ~8. A bf16 bias rounds by >= 1e-3.
            "bias_update_error": Gate(1e-6),
        },
        why="SFT curves: chaos-limited agreement gates from the measured worst case over 5 seeds",
    ),
    # Floors from `python benchmarks/training_noise_floor.py --seeds 3 --dtype bfloat16` (every built-in
    # arch variant x 3 seeds, 2-core CPU: benchmarks/results/training_noise_floor_bf16.md). Both sides
    # compute in bf16 from production-scale weights and step fp32 master weights (MasterWeightAdamW).
    ("sft", "bfloat16"): Profile(
        gates={
            # worst 0.84 (glm4_moe_lite; production-scale weights learn slower than the fp32
            # profile's adversarial init; ernie4_5_moe 0.12-0.19); a model that does not learn
            # stays near 1.0. Gate 0.9.
            "loss_ratio": Gate(0.9),
            # step 0 and the first update: worst 1.2e-2 (ernie4_5_moe vllm_sized; most archs
            # < 1e-3); gate 5e-2 (4x)
            "loss_delta_early": Gate(5e-2),
            # all 24 steps, bf16 routing flips compounding: worst 0.80 (deepseek_v3 vllm_sized);
            # gate 2.0 (2.5x), a crash or divergence bound
            "loss_delta_max": Gate(2.0),
            "lr_rel_delta": Gate(1e-6),
            # the candidate's fp32 bias: floor 0 in all 108 runs; gate 1e-6. A bias kept in bf16
            # rounds updates by ~1e-2 (transformers' MiniMax-M2 reference does: 1.1e-2)
            "bias_update_error": Gate(1e-6),
            # elements > 1 bf16 step off master-weight AdamW after 8 steps at lr 1e-5: floor 0
            # (same fp32 math); gate 1e-3. Plain AdamW on bf16 weights: most elements.
            "small_update_mismatch": Gate(1e-3),
        },
        why="bf16 SFT with fp32 master weights: curve gates 2.5-4x the measured bf16 worst case, update gates at float rounding",
    ),
    # Floors from `python benchmarks/rl_noise_floor.py --seeds 3` (every built-in arch variant x 3 seeds, 2-core
    # CPU, one thread): benchmarks/results/rl_noise_floor.md.
    ("engine_parity", "float32"): Profile(
        gates={
            # floor (worst over the candidate engine with KV cache + left padding and the
            # transformers engine): max|delta logprob| of the actual next tokens 3.2e-5
            # (deepseek_v2); gate 5e-4 (15x, as logit_parity's). vLLM (fp32): see README.
            "max_abs_logprob_delta": Gate(5e-4),
            # floor (fp64-renormalized): KL mean 5.6e-12, max 4.4e-11; KL is quadratic in the
            # logprob delta, so the 15x margin is ~200x here: gates 1e-9, 1e-8
            "kl_mean": Gate(1e-9),
            "kl_max": Gate(1e-8),
            "top1_agreement": Gate(1.0, at_least=True),
        },
        why="fp32 engine vs trainer prompt logprobs: gates >= 10x the measured floor (benchmarks/rl_noise_floor.py)",
    ),
    ("rl", "float32"): Profile(
        gates={
            # engine vs trainer on the sampled tokens, at every step: floor max|delta logprob|
            # 3.2e-5, |mismatch KL (k3, fp64)| 7.3e-12. Gates 5e-4 (15x) and 1e-9 (~140x). Planted
            # faults: temperature on logprobs ~0.7, stale weights >= 1 (>= 1000x the gate).
            "mismatch_max": Gate(5e-4),
            "mismatch_kl": Gate(1e-9),
            # KL to the reference after the first update: smallest seen 0.099 (qwen3_moe
            # unnormalized; 28 cases, 15 archs, seed 0, 10 steps); a reference that follows the
            # policy gives exactly 0. Gate 0.01 (10x below): an update that barely moves fails too.
            "kl_after_update": Gate(0.01),
            # KL at step 0, where policy and reference are the same weights: measured exactly 0
            # in all 28 cases (same forward); gate 1e-6. A one-token shift of the reference
            # logprobs (tests/planted_rl.py) fails it.
            "kl_step0": Gate(1e-6),
            # the KL estimator against its named definition: float rounding only (floor 0)
            "kl_estimator_rel_delta": Gate(1e-6),
            # max - min of the GRPO loss over the run: smallest seen 0.093 (qwen2_moe
            # renormalized_dense0; 28 cases, 15 archs, seed 0); gate 0.009 (10x below it): a loss
            # that is constant, or nearly so, fails
            "loss_spread": Gate(0.009, at_least=True),
            # reward of the exact reversal minus the best wrong answer (the prompt unreversed, an
            # empty answer, another prompt's reversal): smallest over 20,000 texts 0.18 (near-
            # palindromes such as 'memomo mema'); an answer-blind reward gives 0. Gate 0.05.
            "reward_gap": Gate(0.05, at_least=True),
            # routing flips rollout (KV cache) vs training forward, per MoE layer: floor 0 over
            # every arch variant x 3 seeds. A bf16 correction bias in the engine (planted) flips 5.6% of kimi_k25 tokens. Gate 0.5%:
            # 11x below the planted fault, ~15 tokens of a 3,000-token run for near-ties elsewhere.
            "routing_flip_rate": Gate(0.005),
        },
        why="RL loop health and engine/trainer agreement: gates from benchmarks/rl_noise_floor.py",
    ),
    # Floors from `python benchmarks/rl_noise_floor.py --seeds 3 --dtype bfloat16` (every built-in arch
    # variant x 3 seeds, 108 runs, 2-core CPU: benchmarks/results/rl_noise_floor_bf16.md). Policy,
    # engine (the candidate with its KV cache) and frozen reference in bf16 from production-scale
    # weights; the optimizer steps fp32 master weights.
    ("rl", "bfloat16"): Profile(
        gates={
            # engine vs trainer on the sampled tokens: worst max|delta logprob| 0.15 (ernie4_5_moe
            # vllm_sized; every other arch <= 0.023), worst |k3 mismatch KL| 2.1e-4 (same run; others
            # <= 8.3e-6). Gates 0.5 (3x) and 2e-3 (10x). Planted in bf16 (kimi_k25, qwen3_moe): temperature
            # on the logprobs gives mismatch KL 1.19 (600x), an engine on stale weights 0.069 (35x).
            "mismatch_max": Gate(0.5),
            "mismatch_kl": Gate(2e-3),
            # smallest KL after the first update 0.0061 (gpt_oss square_experts); gate 1e-3 (6x below)
            "kl_after_update": Gate(1e-3),
            # same weights, same bf16 forward at step 0: 0 exactly, as in fp32
            "kl_step0": Gate(1e-6),
            "kl_estimator_rel_delta": Gate(1e-6),
            # smallest loss spread 0.0139 (gpt_oss vllm_sized); gate 10x below it
            "loss_spread": Gate(0.0014, at_least=True),
            "reward_gap": Gate(0.05, at_least=True),
            # routing flips rollout vs training forward: worst 0.17% (glm4_moe_lite); gate 0.5% (2.9x). An
            # engine holding the correction bias in bf16 flips 19.6% of kimi_k25's (39x).
            "routing_flip_rate": Gate(0.005),
        },
        why="bf16 RL loop: engine/trainer agreement gates 3-10x the measured bf16 worst case, loop-health gates 6-10x below its smallest",
    ),
    # Floors from `python benchmarks/ep_gpu.py --device cpu --max-ranks 4 --seeds 3 --arch all` (gloo, every
    # built-in arch's faithful variant x 3 seeds x 2..4 ranks, 2-core CPU, one thread per rank): the native EP
    # shard vs the single-process candidate on the same inputs. Only the summation order differs (rows split
    # over ranks, gradients summed by an all-reduce), so floors are a few fp32 ulps; every planted EP bug
    # (tests/planted_ep.py) exceeds its gate by >= 1000x.
    ("expert_parallel", "float32"): Profile(
        gates={
            # max |delta logit| on the rank's real tokens: floor 6.7e-6 (qwen2_moe; logits std ~4);
            # gate 1e-4 (15x). Dropped tokens / skipped routed scaling / wrong offsets: >= 10.
            "logits_max_abs_delta": Gate(1e-4),
            # routing weights per (token, expert), same experts chosen: floor 3.3e-7; gate 5e-6 (15x);
            # routed scaling skipped: 0.85. Chosen experts must agree exactly (inputs drawn clear of ties).
            "routing_weights_max_abs_delta": Gate(5e-6),
            "routing_mismatched_tokens": Gate(0),
            # an MoE layer's experts output, relative to its largest entry: floor 7.7e-7; gate 1e-5 (13x)
            "experts_out_rel_delta": Gate(1e-5),
            # the experts module alone on drawn choices (outputs, input and routing-weight gradients),
            # relative: floor 1.6e-7 (outputs exactly 0); gate 2e-6 (13x); a capacity drop: 0.86
            "dispatch_rel_delta": Gate(2e-6),
            # the ranks' loss shares summed vs the batch loss (candidate's and reference's), relative:
            # floor 2.6e-7 (loss ~13); gate 3e-6 (11x); skipped routed scaling: 6e-3
            "loss_rel_delta": Gate(3e-6),
            # per tensor and rank, max|g_rank - g_single| / max|g_single|: floor 9.9e-7 (qwen2_moe shared
            # experts, 4 ranks); gate 1e-5 (10x); a replicated gradient left un-reduced: >= 0.38
            "grad_rel_delta": Gate(1e-5),
            # the aux-loss shares summed vs the single-process aux loss, relative: floor 2.4e-7; gate 3e-6
            # (12x); statistics left local: 6.5e-3
            "aux_rel_delta": Gate(3e-6),
            # the selection bias after one balancing step: floor 0 (integer loads, the same fp32 ops);
            # any real difference is a multiple of 2 x the rate (0.04). Gate 1e-6 (2 ulps at |bias| ~7).
            "bias_max_abs_delta": Gate(1e-6),
        },
        why="expert-parallel shard vs the single-process candidate: gates 10-15x the measured gloo floors",
    ),
}


def profile(check: str, dtype: str = "float32", overrides: Mapping[str, float] = None) -> Profile:
    try:
        base = PROFILES[(check, dtype)]
    except KeyError:
        known = ", ".join(f"{c}/{d}" for c, d in PROFILES)
        raise KeyError(f"no tolerance profile for check {check!r} at {dtype} (known: {known})") from None
    return base.with_overrides(check, overrides or {})
