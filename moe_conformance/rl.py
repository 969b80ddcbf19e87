"""A short GRPO-style RL loop on the reverse-text task, run by the `rl` suite.

From a short SFT warm start (``RLConfig.warm_steps`` steps of the task loss), for each step:

1. the inference engine (``RLHooks.engine``; the candidate with a KV cache by default) samples
   ``rollouts`` completions for each of ``prompts`` prompts at temperature T, returning each
   token's logprob under ``log_softmax(logits / T)`` (and, where it can, the experts it routed
   each token to);
2. reward = ``RLHooks.reward(text, answer)``: by default difflib's similarity ratio of the
   decoded answer to the reversed prompt text (1.0 for the exact reversal);
3. group-normalized advantages: ``(r - mean_group) / (std_group + 1e-6)``;
4. the trainer (the candidate) recomputes the logprobs of the same tokens; the importance ratio
   ``exp(logp_trainer - logp_engine)`` enters a PPO-clipped objective (one update per batch, so
   the ratio measures the engine/trainer mismatch, which is also recorded per step);
5. KL to the frozen reference policy (the warm-started weights) with a NAMED per-token estimator
   (``RLHooks.kl_estimator``; default ``k3 = exp(ref - logp) - (ref - logp) - 1``, Schulman's
   unbiased, non-negative estimator of KL(policy || reference) from policy samples), weighted by
   ``kl_coef`` in the loss;
6. one AdamW step (grad-norm clipping), then ``engine.load(new weights)``.

Under the bf16 profile (``--dtype bf16``) the policy, the default engine and the frozen reference
compute in bf16 (the candidate as its plugin casts it) and the optimizer steps fp32 master
weights (``training.MasterWeightAdamW``), as production RL trains.

Everything is seeded (prompts, sampling generator, warm-start batches) and runs single-threaded
under the suites, so serial and pytest-xdist runs give the same figures.
"""

from __future__ import annotations

import copy
import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import data, engines, tokenizer, training
from .replay import replay_routing
from .case import logits_of

# --------------------------------------------------------------------------------------------
# Definitions


@dataclass(frozen=True)
class RLConfig:
    steps: int = 10
    prompts: int = 4
    rollouts: int = 4
    max_tokens: int = 14
    temperature: float = 0.8
    lr: float = 1e-3
    kl_coef: float = 0.1
    clip_eps: float = 0.2
    grad_clip: float = 1.0
    warm_steps: int = 8
    warm_batch: int = 8
    warm_lr: float = 3e-3


def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


# Per-token estimators of KL(policy || reference) from tokens sampled by the policy.
KL_DEFINITIONS: dict[str, tuple[Callable, str]] = {
    "k1": (k1, "logp - ref_logp"),
    "k2": (k2, "0.5 * (logp - ref_logp)^2"),
    "k3": (k3, "exp(ref_logp - logp) - (ref_logp - logp) - 1"),
}


@dataclass(frozen=True)
class KLEstimator:
    name: str  # one of KL_DEFINITIONS: the definition the rl suite holds the function to
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logp, ref_logp) -> per-token KL


K3 = KLEstimator("k3", k3)


def reverse_reward(text: str, answer: str) -> float:
    """Similarity of the answer to the reversed prompt text (difflib ratio, 1.0 when exact)."""
    return difflib.SequenceMatcher(None, answer, data.reverse(text), autojunk=False).ratio()


@dataclass(frozen=True)
class RLHooks:
    """The RL pieces under test. A team plugs in its own through
    ``ArchSpec(rl=RLHooks(engine=MyEngine, ...))``; the suites check them."""

    engine: Callable[..., engines.Engine] = engines.default_engine  # (case, candidate_state) -> Engine
    reward: Callable[[str, str], float] = reverse_reward
    kl_estimator: KLEstimator = K3
    # routing replay: (case, trainer model, routes) -> context manager in which the trainer's
    # forward uses the engine's recorded experts (moe_conformance.replay; default: forced
    # through the candidate's probes, gates from the trainer's router at the replayed experts)
    replay: Callable[..., Any] = replay_routing


REFERENCE_HOOKS = RLHooks()


def hooks_for(spec) -> RLHooks:
    return getattr(spec, "rl", None) or REFERENCE_HOOKS


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class RLLog:
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)  # mean per-token estimate, before the step's update
    reward_mean: list[float] = field(default_factory=list)
    reward_std: list[float] = field(default_factory=list)  # mean within-group std
    grad_norm: list[float] = field(default_factory=list)
    ratio_mean: list[float] = field(default_factory=list)
    clip_fraction: list[float] = field(default_factory=list)
    # engine vs trainer on the sampled tokens (same weights: only implementation noise)
    mismatch_kl: list[float] = field(default_factory=list)  # k3 estimate of KL(engine || trainer)
    mismatch_max: list[float] = field(default_factory=list)  # max |logp_engine - logp_trainer|
    mismatch_mean: list[float] = field(default_factory=list)
    # diagnostics: how close the engine's logprobs are to known wrong answers
    engine_vs_reference_max: list[float] = field(default_factory=list)  # the frozen initial weights
    engine_vs_untempered_max: list[float] = field(default_factory=list)  # log_softmax(logits) / T
    completion_tokens: list[int] = field(default_factory=list)
    routing_tokens: list[int] = field(default_factory=list)
    routing_flips: list[list[int]] = field(default_factory=list)  # per step, per MoE layer
    error: str | None = None


@dataclass
class RLRun:
    cfg: RLConfig
    engine: str
    estimator: KLEstimator
    log: RLLog
    kl_samples: tuple[torch.Tensor, torch.Tensor] | None = None  # (logp, ref_logp) of the last step
    examples: list[tuple[str, str, float]] = field(default_factory=list)  # (prompt, answer, reward), last step
    prompts: list[str] = field(default_factory=list)
    reports_routing: bool = False
    engine_seconds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    warm_loss: list[float] = field(default_factory=list)


def warm_start(case, cfg: RLConfig) -> tuple[torch.nn.Module, list[float]]:
    """A short SFT on the reverse-text task so that rewards are not all noise (under the bf16
    profile the candidate computes in bf16 and the optimizer steps fp32 master weights)."""
    tok = tokenizer.load()
    model = case.candidate(dtype=case.dtype).train()
    tcfg = training.TrainConfig(steps=cfg.warm_steps, lr=cfg.warm_lr, warmup=1)
    opt = training.build_optimizer(model, tcfg)
    losses = []
    for batch in data.batches(tok, cfg.warm_steps, cfg.warm_batch, case.case_seed + 101):
        batch = batch.to(case.device)
        opt.zero_grad(set_to_none=True)
        loss = training.lm_loss(logits_of(model(**batch.kwargs)), batch.labels)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), tcfg.clip, foreach=False)
        if not torch.isfinite(norm):  # say so here: NaN weights would only show as a sampler crash later
            raise FloatingPointError(f"warm start step {len(losses)}: the candidate's grad norm is not finite ({float(norm)})")
        opt.step()
        losses.append(float(loss.detach()))
    return model, losses


def prompt_ids(tok, text: str) -> list[int]:
    return [tok.token_to_id("<bos>"), *tok.encode(text).ids, tok.token_to_id("<sep>")]


def answer_text(tok, tokens: list[int]) -> str:
    eos = tok.token_to_id("<eos>")
    cut = tokens[: tokens.index(eos)] if eos in tokens else tokens
    return tok.decode(cut, skip_special_tokens=True).strip()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_rl(case, hooks: RLHooks = REFERENCE_HOOKS, cfg: RLConfig = RLConfig(), engine_factory=None) -> RLRun:
    """``cfg.steps`` GRPO steps; ``engine_factory`` (case, state) -> Engine overrides the hooks'."""
    start = time.perf_counter()
    tok = tokenizer.load()
    eos = tok.token_to_id("<eos>")
    policy, warm_losses = warm_start(case, cfg)
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    engine = (engine_factory or hooks.engine)(case, _state(policy))
    run = RLRun(cfg, getattr(engine, "name", type(engine).__name__), hooks.kl_estimator, RLLog(),
                reports_routing=bool(getattr(engine, "reports_routing", False)), warm_loss=warm_losses)
    opt = training.build_optimizer(policy, training.TrainConfig(lr=cfg.lr, weight_decay=0.0))
    tap = training.routing_tap(case, policy, "cand")
    texts = data.texts(cfg.steps * cfg.prompts, case.case_seed + 202)
    log, T = run.log, cfg.temperature
    try:
        for step in range(cfg.steps):
            step_texts = texts[step * cfg.prompts:(step + 1) * cfg.prompts]
            run.prompts = step_texts
            prompts = [prompt_ids(tok, t) for t in step_texts]
            rollouts = engine.generate(prompts, cfg.rollouts, cfg.max_tokens, T, case.case_seed + step, eos)
            rewards = torch.tensor([hooks.reward(step_texts[r.prompt_index], answer_text(tok, r.tokens)) for r in rollouts],
                                   dtype=torch.float32, device=case.device)
            groups = rewards.view(cfg.prompts, cfg.rollouts)
            adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).reshape(-1)
            run.examples = [(step_texts[r.prompt_index], answer_text(tok, r.tokens), float(x))
                            for r, x in zip(rollouts, rewards)]
            # the batch: prompt + completion, right-padded; completion token j sits at len(prompt) + j
            seqs = [r.prompt + r.tokens for r in rollouts]
            S = max(len(s) for s in seqs)
            B = len(seqs)
            ids = torch.zeros(B, S, dtype=torch.long)
            mask = torch.zeros(B, S, dtype=torch.long)
            comp = torch.zeros(B, S, dtype=torch.bool)  # positions whose NEXT token is a completion token
            engine_lp = torch.zeros(B, S)
            for b, (r, s) in enumerate(zip(rollouts, seqs)):
                ids[b, :len(s)] = torch.tensor(s)
                mask[b, :len(s)] = 1
                P = len(r.prompt)
                comp[b, P - 1:P - 1 + len(r.tokens)] = True
                engine_lp[b, P - 1:P - 1 + len(r.tokens)] = torch.tensor(r.logprobs, dtype=torch.float32)
            ids, mask, comp = ids.to(case.device), mask.to(case.device), comp.to(case.device)
            targets = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)
            policy.train()
            with tap():
                logits = logits_of(policy(input_ids=ids, attention_mask=mask)).float()
            logp = (logits / T).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
            with torch.no_grad():
                untempered = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0] / T
                ref_logits = logits_of(reference(input_ids=ids, attention_mask=mask)).float()
                ref_lp = (ref_logits / T).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
            # engine / trainer mismatch on the sampled tokens
            lp_d, e_lp = logp.detach()[comp].double(), engine_lp.to(logp.device)[comp].double()
            delta = e_lp - lp_d
            log.mismatch_kl.append(float(k3(e_lp, lp_d).mean()))  # KL(engine || trainer), engine samples
            log.mismatch_max.append(float(delta.abs().max()))
            log.mismatch_mean.append(float(delta.abs().mean()))
            log.engine_vs_reference_max.append(float((e_lp - ref_lp[comp].double()).abs().max()))
            log.engine_vs_untempered_max.append(float((e_lp - untempered[comp].double()).abs().max()))
            log.completion_tokens.append(int(comp.sum()))
            # routing: the engine's choice per fed token vs the training forward's
            if run.reports_routing and rollouts[0].routing is not None:
                train_idx = [i.reshape(B, S, -1) for i in tap.indices]
                flips, count = [0] * len(train_idx), 0
                for b, r in enumerate(rollouts):
                    for layer, (eng_layer, tr) in enumerate(zip(r.routing, train_idx)):
                        tr_sorted = tr[b, :len(eng_layer)].sort(-1).values.tolist()
                        flips[layer] += sum(1 for e, t in zip(eng_layer, tr_sorted) if e != t)
                    count += len(r.routing[0]) if r.routing else 0
                log.routing_flips.append(flips)
                log.routing_tokens.append(count)
            # the GRPO objective
            ratio = (logp - engine_lp.to(logp.device)).exp()
            a = adv.to(logp.device)[:, None]
            pg = -torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
            kl_tok = hooks.kl_estimator.fn(logp, ref_lp)
            per_token = pg + cfg.kl_coef * kl_tok
            cm = comp.float()
            loss = ((per_token * cm).sum(1) / cm.sum(1).clamp_min(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None],
                                                  cfg.grad_clip, foreach=False)
            opt.step()
            log.loss.append(float(loss.detach()))
            log.kl.append(float(kl_tok.detach()[comp].mean()))
            log.grad_norm.append(float(norm))
            log.reward_mean.append(float(rewards.mean()))
            log.reward_std.append(float(groups.std(1).mean()))
            log.ratio_mean.append(float(ratio.detach()[comp].mean()))
            log.clip_fraction.append(float(((ratio.detach() - 1).abs() > cfg.clip_eps)[comp].float().mean()))
            run.kl_samples = (logp.detach()[comp].double(), ref_lp[comp].double())
            policy.eval()
            engine.load(_state(policy))
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported by the checks
        import traceback

        log.error = f"step {len(log.loss)}: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
    finally:
        run.engine_seconds = list(getattr(engine, "starts", []))
        engine.close()
    run.seconds = time.perf_counter() - start
    return run


def finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def rounded(values):
    return [float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v for v in values]


# --------------------------------------------------------------------------------------------
# Engine / trainer mismatch during a run: what the rl and engine_parity suites report


def mismatch_problems(run: RLRun, steps: list[int], gates: dict[str, float]) -> list[str]:
    """One line per step whose engine/trainer mismatch (k3 KL, max |delta logprob|) exceeds its gate."""
    log = run.log
    out = []
    for s in steps:
        figs = {"mismatch_kl": log.mismatch_kl[s], "mismatch_max": log.mismatch_max[s]}
        over = [f"{k} = {v:.3g} (gate: <= {gates[k]:.3g})" for k, v in figs.items() if not abs(v) <= gates[k]]
        if over:
            out.append(f"step {s}: " + "; ".join(over) + f"; mean |delta logprob| {log.mismatch_mean[s]:.3g} over "
                       f"{log.completion_tokens[s]} sampled tokens")
    return out


def diagnose(run: RLRun, steps: list[int], gates: dict[str, float]) -> list[str]:
    """Known faults recognized from the run's diagnostics: temperature on the logprobs, stale weights."""
    log, T = run.log, run.cfg.temperature
    hints = []
    g = gates["mismatch_max"]
    bad = [s for s in steps if not log.mismatch_max[s] <= g]
    if bad and all(log.engine_vs_untempered_max[s] <= g for s in bad):
        hints.append(f"the engine's logprobs equal log_softmax(logits) / T (T = {T}; max|delta| "
                     f"{max(log.engine_vs_untempered_max[s] for s in bad):.3g}): temperature applied to the logprobs "
                     f"instead of the logits")
    after = [s for s in bad if s > 0]
    if after and all(log.engine_vs_reference_max[s] <= g for s in after):
        hints.append(f"at step(s) {after[:5]} the engine's logprobs equal the frozen initial weights' (max|delta| "
                     f"{max(log.engine_vs_reference_max[s] for s in after):.3g}): stale weights, the engine did not "
                     f"receive the weight update")
    return hints


def mismatch_curves(case_id: str, run: RLRun) -> dict:
    log = run.log
    return {"title": f"{case_id}: engine ({run.engine}) vs trainer logprobs on sampled tokens",
            "panels": {"mismatch KL (k3, engine || trainer)": {"mismatch_kl": rounded(log.mismatch_kl)},
                       "max |delta logprob|": {"mismatch_max": rounded(log.mismatch_max),
                                               "mean": rounded(log.mismatch_mean)}},
            "log_panels": ["mismatch KL (k3, engine || trainer)", "max |delta logprob|"]}
