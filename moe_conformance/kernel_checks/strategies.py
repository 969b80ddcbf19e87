"""Hypothesis strategies for kernel cases (their settings profiles: profiles.py).

A case is a small frozen record (shapes, routing config, token distribution, seed); the
tensors are made from its seed by `checks.py`, so a failing case prints as something you can
paste into a test. Shapes are tiny on purpose: the Triton interpreter runs every program in
Python. The strategies still reach the shapes that break kernels: one token, experts with no
token, every token on one expert, odd hidden sizes, expert counts that are not powers of two,
top-k from 1 to 8.

Pass an architecture's routing config (`RoutingConfig`) to draw cases that match it (same
scoring and group layout, expert counts divisible by n_group, top-k the groups can hold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from ..routing import Routing
from .profiles import CI_PROFILE, CI_SETTINGS

__all__ = [
    "RoutingConfig", "RouteCase", "ExpertsCase", "DISTRIBUTIONS", "CI_PROFILE", "CI_SETTINGS",
    "routing_configs", "route_cases", "experts_cases", "edge_cases", "route_edge_cases",
]

# one token total / some experts get none / every token picks one expert / anything
DISTRIBUTIONS = ("random", "some_empty", "all_on_one", "one_token")


# The routing knobs of an architecture: the routing oracle's record.
RoutingConfig = Routing


@dataclass(frozen=True)
class RouteCase:
    tokens: int
    num_experts: int
    top_k: int
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    seed: int = 0
    # the correction bias's common offset, and a shift of every logit: an extreme case puts the
    # bias far above the scores (sigmoid ~1e-8 against a bias ~12, as trained checkpoints have)
    bias_offset: float = 2.0
    logit_shift: float = 0.0

    def describe(self) -> str:
        extreme = (f" bias_offset={self.bias_offset:g} logit_shift={self.logit_shift:g}"
                   if (self.bias_offset, self.logit_shift) != (2.0, 0.0) else "")
        return (f"T={self.tokens} E={self.num_experts} K={self.top_k} "
                f"[{self.routing.describe()}] seed={self.seed}{extreme}")


@dataclass(frozen=True)
class ExpertsCase:
    tokens: int
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    distribution: str = "random"
    seed: int = 0

    def describe(self) -> str:
        return (f"T={self.tokens} H={self.hidden} I={self.intermediate} E={self.num_experts} "
                f"K={self.top_k} dist={self.distribution} seed={self.seed}")


def routing_configs() -> st.SearchStrategy[RoutingConfig]:
    """Any routing config: softmax (Mixtral/Qwen style) or sigmoid (DeepSeek style)."""
    softmax = st.builds(RoutingConfig, scoring=st.just("softmax"), norm_topk_prob=st.booleans())
    sigmoid = st.tuples(st.integers(1, 4), st.integers(1, 4), st.booleans(),
                        st.sampled_from([1.0, 2.5]), st.booleans()).map(
        lambda a: RoutingConfig("sigmoid", a[0], min(a[1], a[0]), a[2], a[3], a[4]))
    return st.one_of(softmax, sigmoid)


def _experts_for(routing: RoutingConfig, draw, max_per_group: int) -> int:
    if routing.n_group > 1:
        return routing.n_group * draw(st.integers(2, max_per_group))
    return draw(st.integers(2, 2 * max_per_group + 1))


@st.composite
def route_cases(draw, routing: RoutingConfig | None = None, max_tokens: int = 12,
                max_experts_per_group: int = 5) -> RouteCase:
    """Routing cases; with `routing` given, they follow that architecture's config."""
    routing = routing if routing is not None else draw(routing_configs())
    E = _experts_for(routing, draw, max_experts_per_group)
    available = routing.topk_group * (E // routing.n_group) if routing.n_group > 1 else E
    K = draw(st.integers(1, min(8, available)))
    return RouteCase(draw(st.integers(1, max_tokens)), E, K, routing, draw(st.integers(0, 2**16)))


@st.composite
def experts_cases(draw, routing: RoutingConfig | None = None, max_tokens: int = 8,
                  max_hidden: int = 24, max_intermediate: int = 20, max_experts: int = 9) -> ExpertsCase:
    """Grouped-GEMM cases: odd sizes, E not a power of two, K in 1..8, skewed token loads.

    The experts kernels do not see the routing's group layout, so `routing` only bounds
    top-k by what the architecture can select; expert counts stay small because the Triton
    interpreter pays per expert.
    """
    E = draw(st.integers(2, max_experts))
    K = draw(st.integers(1, min(8, E - 1 if E > 2 else E)))
    if routing is not None and routing.n_group > 1:
        K = min(K, routing.topk_group * max(2, E // routing.n_group))
    dist = draw(st.sampled_from(DISTRIBUTIONS if E > K else ("random", "all_on_one", "one_token")))
    T = 1 if dist == "one_token" else draw(st.integers(1, max_tokens))
    return ExpertsCase(T, draw(st.integers(1, max_hidden)), draw(st.integers(1, max_intermediate)),
                       E, K, dist, draw(st.integers(0, 2**16)))


def route_edge_cases(routing: RoutingConfig | None = None) -> list[RouteCase]:
    """Routing cases every run covers, whatever hypothesis draws: with a correction bias, one
    whose bias offset (12) dwarfs the scores (sigmoid of logits near -18: ~1e-8). In fp32,
    score + bias rounds to the bias, so a kernel that recovers the unbiased score as
    ``selected - bias`` gets 0 for every expert (flashinfer #3875, TRT-LLM #13328); the weights
    must come from the unbiased scores."""
    if routing is None or not routing.has_correction_bias:
        return []
    per_group = 3
    E = routing.n_group * per_group if routing.n_group > 1 else 10
    kept = routing.topk_group * per_group if routing.n_group > 1 else E
    return [RouteCase(9, E, min(3, kept), routing, seed=5, bias_offset=12.0, logit_shift=-18.0)]


def edge_cases(routing: RoutingConfig | None = None) -> list[ExpertsCase]:
    """A fixed handful that every run covers, whatever hypothesis draws: one token, every
    token on one expert, empty experts with an odd hidden size, top-8 of 9 experts."""
    return [
        ExpertsCase(1, 17, 12, 3, 1, "one_token", seed=1),
        ExpertsCase(6, 24, 20, 5, 2, "all_on_one", seed=2),
        ExpertsCase(7, 19, 13, 6, 3, "some_empty", seed=3),
        ExpertsCase(5, 16, 8, 9, 8, "random", seed=4),
    ]
