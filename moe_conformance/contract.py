"""The candidate contract: everything the suites may assume about a team's implementation.

Required (every check relies on these, and the ``contract`` family checks them first):

- ``ArchSpec.candidate(config) -> torch.nn.Module``: built from the variant's transformers config
  (the whole config; kimi_k25's is the multimodal one, so take ``config.text_config`` yourself).
- ``model(input_ids=..., attention_mask=..., position_ids=...)``, always by keyword, returns the
  logits ``[B, S, vocab]``: a tensor, an object with ``.logits``, or a tuple/list whose first
  item is the logits. ``attention_mask`` ([B, S], 1 = real token) and ``position_ids`` ([B, S])
  may each be absent. Packed inputs are passed as ``position_ids`` that restart at 0 where a
  document starts, with no ``attention_mask`` (transformers' convention).
- ``state_dict()`` / ``load_state_dict(state, strict=True)`` in the candidate's own naming, and a
  converter with ``to_candidate(hf_state, config)`` and ``to_hf(candidate_state, config)``, where
  the HF side is the on-disk checkpoint (what ``save_pretrained`` writes). Converters get copies
  of their input; ``config`` is the same config the candidate was built from.
- ``copy.deepcopy(model)`` works and eval mode is deterministic.

Optional (declared in ``ArchSpec(probes=Probes(...))`` and friends; each unlocks checks, and a
check whose probe is not declared reports "not applicable" with what to declare):

- ``Probes.pairs``: (reference module, candidate module, role) correspondences. Localization
  compares their outputs; the ``router`` and ``experts`` roles say where routing is read.
- ``Probes.router`` (:class:`RouterProbe`): how to read a router module's output as a
  :class:`RouterReading`, and how to force a routing decision into it.
- ``Probes.experts`` (:class:`ExpertsProbe`): how to call an experts module on given choices,
  and how to read/force the choices it receives.
- ``ArchSpec.decoding`` (:class:`Decoding`): incremental decoding with a cache object; without
  it, engines run full forwards.
- ``ArchSpec.cast``: how to put the candidate in a dtype while keeping named tensors in fp32
  (default :func:`default_cast`).

The defaults fit transformers-style code: a router returning ``(router_logits, topk_weights,
topk_indices)`` and experts called as ``experts(hidden [T, H], topk_indices [T, K],
topk_weights [T, K]) -> [T, H]``. Nothing else is assumed: no attribute, module name, argument
order or cache class beyond what is declared here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("hidden", "router", "experts")


@dataclass(frozen=True)
class ModulePair:
    """A reference submodule and the candidate submodule that computes the same thing.
    ``{i}`` in a name stands for the layer index. ``role``: ``hidden`` (compare outputs),
    ``router`` (read both with the router probes) or ``experts``."""

    ref: str
    cand: str
    role: str = "hidden"
    layer: int | None = None  # set when a {i} template is expanded


@dataclass
class RouterReading:
    """One router's decision for T tokens. ``indices``/``weights`` may be None where the
    router module only scores (top-k done elsewhere: declare it on :class:`ExpertsProbe`)."""

    indices: Any = None  # [T, K] long: chosen experts
    weights: Any = None  # [T, K]: combine weights as applied (after renormalization and scaling)
    logits: Any = None  # [T, E]: pre-activation router logits, where the router exposes them
    scores: Any = None  # [T, E]: post-activation scores (sigmoid/softmax), where exposed


def read_logits_weights_indices(output: Any) -> RouterReading:
    """transformers' MoE routers (and the native candidate's): ``(logits, weights, indices)``."""
    if not isinstance(output, (tuple, list)) or len(output) != 3:
        what = f"{len(output)} values" if isinstance(output, (tuple, list)) else f"a {type(output).__name__}"
        raise ProbeError(f"router output is {what}, expected 3 (router_logits, topk_weights, topk_indices)")
    logits, weights, indices = output
    return RouterReading(indices=indices, weights=weights, logits=logits)


def force_logits_weights_indices(output: Any, forced: RouterReading) -> Any:
    logits, weights, indices = output
    return logits, forced.weights.to(weights.dtype).reshape(weights.shape), forced.indices.to(indices.dtype).reshape(indices.shape)


@dataclass(frozen=True)
class RouterProbe:
    """How to read a router module's forward output (``read(output) -> RouterReading``) and how
    to replace its decision (``force(output, reading) -> output``; None: it cannot be forced
    there, so force at the experts probe or the routing-pinned checks are not applicable)."""

    read: Callable[[Any], RouterReading] = read_logits_weights_indices
    force: Callable[[Any, RouterReading], Any] | None = force_logits_weights_indices


def call_hidden_indices_weights(experts: Any, x_TH: Any, indices_TK: Any, weights_TK: Any) -> Any:
    return experts(x_TH, indices_TK, weights_TK)


def choice_from_args(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """The (indices, weights) an experts module received as ``(hidden, indices, weights)``."""
    if len(args) >= 3:
        return args[1], args[2]
    raise ProbeError(f"experts were called with {len(args)} positional argument(s) and keywords "
                     f"{sorted(kwargs)}, expected (hidden, topk_indices, topk_weights)")


def force_choice_in_args(args: tuple, kwargs: dict, indices: Any, weights: Any) -> tuple[tuple, dict]:
    hidden, old_i, old_w, *rest = args
    return (hidden, indices.to(old_i.dtype).reshape(old_i.shape), weights.to(old_w.dtype).reshape(old_w.shape), *rest), kwargs


@dataclass(frozen=True)
class ExpertsProbe:
    """How to drive an experts module: ``call(module, x [T, H], indices [T, K], weights [T, K])
    -> [T, H]`` computes the weighted sum of the chosen experts; ``read_choice(args, kwargs)``
    and ``force_choice(args, kwargs, indices, weights)`` read and replace the choice in the
    module's own forward arguments (None: not available)."""

    call: Callable[..., Any] = call_hidden_indices_weights
    read_choice: Callable[[tuple, dict], tuple[Any, Any]] | None = choice_from_args
    force_choice: Callable[..., tuple[tuple, dict]] | None = force_choice_in_args


@dataclass(frozen=True)
class Probes:
    """What the plugin declares about its candidate's internals. ``router=None`` or
    ``experts=None`` declares that the candidate offers no such probe."""

    pairs: Sequence[ModulePair] = ()
    router: RouterProbe | None = RouterProbe()
    experts: ExpertsProbe | None = ExpertsProbe()


@dataclass(frozen=True)
class Decoding:
    """Incremental decoding: ``new_cache(model)`` makes an empty cache; each forward gets it as
    ``model(input_ids=new_tokens, attention_mask=mask_of_past_and_new, position_ids=new_positions,
    **{keyword: cache})`` and appends to it. Declare this to have the engines decode token by
    token through your cache (a KV-cache bug then shows as engine/trainer mismatch)."""

    new_cache: Callable[[Any], Any]
    keyword: str = "cache"


class ProbeError(ValueError):
    """A declared probe does not fit what the candidate does; the message names the convention."""


def default_cast(model: Any, dtype: Any, keep_fp32: frozenset[str] = frozenset()) -> Any:
    """``model.to(dtype)``, then the named tensors (parameters or buffers, candidate naming)
    back to fp32: the tensors the reference keeps in fp32 in its own bf16 checkpoint."""
    import torch

    model = model.to(dtype)
    if keep_fp32:
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update(model.named_buffers(remove_duplicate=False))
        for name in keep_fp32:
            tensor = named.get(name)
            if tensor is not None and tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32)
    return model


# --------------------------------------------------------------------------------------------
# Calling the converter: config passed where the converter takes one (wave-1 converters took
# only the state).


def _takes_config(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (len(positional) >= 2 or any(p.name == "config" for p in params)
            or any(p.kind == p.VAR_POSITIONAL for p in params))


def convert(fn: Callable, state: dict, config: Any) -> dict:
    return fn(state, config) if _takes_config(fn) else fn(state)


@dataclass
class Violations:
    """Contract problems found on the actual candidate, by convention name."""

    problems: dict[str, str] = field(default_factory=dict)
