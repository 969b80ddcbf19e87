"""The routing oracle: one definition of MoE top-k routing, read from an architecture's config.

Every place the suites need routing math uses this: the kernel references, the routing
margins of the tiny configs, the probes of candidates whose router module only scores (top-k
done elsewhere), and the topology validation. It follows transformers' semantics:

- ``softmax``: softmax over all experts, top-k of the probabilities (Mixtral, Qwen, OLMoE,
  DeepSeek-V2);
- ``sigmoid``: sigmoid scores (DeepSeek-V3, Kimi K2, GLM-4.5, MiniMax-M2); the correction bias
  is added to a copy used only to choose experts;
- ``softmax_topk``: top-k of the logits, softmax over those k (gpt-oss);
- ``sigmoid_topk``: top-k of the logits, each weight the sigmoid of its logit (Llama 4);
- group-limited choice (``n_group > 1``): keep the ``topk_group`` groups with the best group
  score (``top2_sum``: sum of the group's two best biased scores, DeepSeek-V3; ``max``: its
  best score, DeepSeek-V2) and drop every other expert (-inf, never 0: with scores of both
  signs a 0 can still be chosen);
- weights are the unbiased scores of the chosen experts, renormalized over the k when
  ``norm_topk_prob`` (denominator + 1e-20), then times ``routed_scaling_factor``.

Ties go to the lower expert index (stable sort); callers that compare against other code skip
tokens whose margin is below their noise (``margins``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SCORINGS = ("sigmoid", "softmax", "softmax_topk", "sigmoid_topk")
GROUP_SCORES = ("top2_sum", "max")


@dataclass(frozen=True)
class Routing:
    """The routing knobs of an architecture (everything but the logits, sizes and bias)."""

    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    has_correction_bias: bool = False
    group_score: str = "top2_sum"  # last: positional uses of the fields before it keep their meaning

    def describe(self) -> str:
        s = f"{self.scoring} norm={self.norm_topk_prob} scale={self.routed_scaling_factor:g}"
        if self.n_group > 1:
            s += f" groups={self.topk_group}/{self.n_group}" + ("" if self.group_score == "top2_sum" else f"({self.group_score})")
        return s + (" +bias" if self.has_correction_bias else "")

    # ---- topology
    def problems(self, num_experts: int, top_k: int) -> list[str]:
        """Why this topology is invalid (transformers accepts some silently: #48647)."""
        out = []
        if self.scoring not in SCORINGS:
            out.append(f"scoring {self.scoring!r} is not one of {SCORINGS}")
        if not 1 <= top_k <= num_experts:
            out.append(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if self.n_group > 1:
            if num_experts % self.n_group:
                out.append(f"num_experts={num_experts} is not divisible by n_group={self.n_group}")
            elif self.n_group == num_experts:
                out.append(f"n_group={self.n_group} equals the expert count: one expert per group, so the "
                           f"group score (top-2 sum) is undefined")
            elif self.group_score == "top2_sum" and num_experts // self.n_group < 2:
                out.append(f"{num_experts // self.n_group} expert(s) per group: the top-2 group score needs >= 2")
            if not 1 <= self.topk_group <= self.n_group:
                out.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            elif not num_experts % self.n_group and top_k > self.topk_group * (num_experts // self.n_group):
                out.append(f"top_k={top_k} exceeds the {self.topk_group * (num_experts // self.n_group)} experts "
                           f"that topk_group={self.topk_group} kept groups of {num_experts // self.n_group} hold")
        if self.group_score not in GROUP_SCORES:
            out.append(f"group_score {self.group_score!r} is not one of {GROUP_SCORES}")
        return out

    # ---- the math
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scoring in ("sigmoid", "sigmoid_topk"):  # sigmoid_topk: ranks as the logits do
            return logits.sigmoid()
        if self.scoring == "softmax":
            return logits.softmax(-1)
        return logits  # softmax_topk: the logits rank the experts

    def _group_mask(self, choice: torch.Tensor) -> torch.Tensor:
        T, E = choice.shape
        grouped = choice.view(T, self.n_group, E // self.n_group)
        if self.group_score == "max":
            group = grouped.max(-1).values
        else:
            group = grouped.topk(2, dim=-1).values.sum(-1)
        kept = _stable_top(group, self.topk_group)
        keep = torch.zeros(T, self.n_group, dtype=torch.bool, device=choice.device).scatter_(1, kept, True)
        return keep.repeat_interleave(E // self.n_group, dim=1)

    def choice_scores(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """What top-k is taken over: scores (+ bias), with dropped groups at -inf."""
        choice = self.scores(logits)
        if bias is not None:
            choice = choice + bias.to(choice)
        if self.n_group > 1:
            choice = choice.masked_fill(~self._group_mask(choice), float("-inf"))
        return choice

    def route(self, logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, K], indices [T, K]) in the logits' dtype (pass fp64 for an fp64 oracle)."""
        logits = logits.reshape(-1, logits.shape[-1])
        indices = _stable_top(self.choice_scores(logits, bias), top_k)
        if self.scoring == "softmax_topk":
            weights = logits.gather(-1, indices).softmax(-1)
        elif self.scoring == "sigmoid_topk":
            weights = logits.gather(-1, indices).sigmoid()
        else:
            weights = self.scores(logits).gather(-1, indices)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices

    def margins(self, logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per token, how far each decision is from flipping: the gap between the k-th and
        (k+1)-th choice (``topk_margin``) and, with groups, between the last kept and the first
        dropped group (``group_margin``). Softmax routers are measured on the logits (the same
        order, not squashed by the normalization)."""
        x = logits.reshape(-1, logits.shape[-1]).double()
        ranked_on = x if self.scoring != "sigmoid" else x.sigmoid()
        if bias is not None:
            # a bias is added to the scores (ERNIE 4.5: to the softmax), not to the logits
            ranked_on = (x.softmax(-1) if self.scoring == "softmax" else ranked_on) + bias.to(ranked_on)
        out = {}
        if self.n_group > 1:
            T, E = ranked_on.shape
            grouped = ranked_on.view(T, self.n_group, E // self.n_group)
            group = grouped.max(-1).values if self.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
            ordered = group.sort(-1, descending=True).values
            if self.topk_group < self.n_group:
                out["group_margin"] = ordered[:, self.topk_group - 1] - ordered[:, self.topk_group]
            ranked_on = ranked_on.masked_fill(~self._group_mask(ranked_on), float("-inf"))
        ordered = ranked_on.sort(-1, descending=True).values
        if top_k < ordered.shape[-1]:
            gap = ordered[:, top_k - 1] - ordered[:, top_k]
            out["topk_margin"] = torch.where(torch.isfinite(gap), gap, torch.full_like(gap, float("inf")))
        return out


def _stable_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per row; ties to the lower index (torch.topk makes no promise)."""
    return x.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def _first(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def from_config(cfg: Any, scoring: str, correction_bias: bool = False) -> Routing:
    """The routing of a transformers MoE config (DeepSeek/GLM/Kimi, Mixtral, Qwen, OLMoE,
    MiniMax, gpt-oss naming). ``scoring`` comes from the arch's declared capabilities (configs
    rarely name it); DeepSeek-V2's ``topk_method`` picks its group score."""
    method = getattr(cfg, "topk_method", None)
    grouped = method not in ("greedy",)
    # configs without the field always renormalize their top-k (Mixtral's softmax, MiniMax-M2's
    # sigmoid); those that may not (Qwen2-MoE, OLMoE, DeepSeek) carry norm_topk_prob. Scorings
    # over the chosen logits only never do (Llama 4: each weight its own sigmoid)
    default_norm = scoring not in ("sigmoid_topk", "softmax_topk")
    return Routing(
        scoring=scoring,
        n_group=int(_first(cfg, "n_group", default=1) or 1) if grouped else 1,
        topk_group=int(_first(cfg, "topk_group", default=1) or 1) if grouped else 1,
        group_score="max" if method == "group_limited_greedy" else "top2_sum",
        norm_topk_prob=bool(_first(cfg, "norm_topk_prob", default=default_norm)),
        routed_scaling_factor=float(_first(cfg, "routed_scaling_factor", default=1.0) or 1.0),
        has_correction_bias=correction_bias,
    )


def num_experts(cfg: Any) -> int:
    return int(_first(cfg, "n_routed_experts", "num_experts", "num_local_experts"))


def top_k(cfg: Any) -> int:
    return int(_first(cfg, "num_experts_per_tok", "moe_topk", "top_k"))
