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
- The candidate builds under the current default device: the dry run builds the released,
  full-size config inside ``with torch.device("meta")``; a factory that moves its model to the
  CPU explicitly would materialize hundreds of GB. Parameter names may differ from state-dict
  names (fused parameters exposed as separate state entries): the suites go through
  ``state_dict()`` and the converter.

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
    kinds = ["integer" if not getattr(t, "is_floating_point", lambda: True)() else "float" for t in output]
    if kinds != ["float", "float", "integer"]:
        # another 3-tuple (torchtitan's (top_scores, expert_ids, scores)) must not be read as this one
        raise ProbeError(f"router output is 3 values of kinds {kinds}, expected (router_logits float, topk_weights "
                         f"float, topk_indices integer): declare RouterProbe(read=...) for this router")
    return RouterReading(indices=indices, weights=weights, logits=logits)


def force_logits_weights_indices(output: Any, forced: RouterReading) -> Any:
    logits, weights, indices = output
    # contiguous: dispatchers .view() what the router returns
    return (logits, forced.weights.to(weights.dtype).reshape(weights.shape).contiguous(),
            forced.indices.to(indices.dtype).reshape(indices.shape).contiguous())


@dataclass(frozen=True)
class RouterProbe:
    """How to read a router module's forward output (``read(output) -> RouterReading``) and how
    to replace its decision (``force(output, reading) -> output``; None: it cannot be forced
    there, so force at the experts probe or the routing-pinned checks are not applicable).
    ``logits_from``: a child of the router module whose output is the router logits [T, E]
    (torchtitan's ``gate``), for routers whose own output carries no logits."""

    read: Callable[[Any], RouterReading] = read_logits_weights_indices
    force: Callable[[Any, RouterReading], Any] | None = force_logits_weights_indices
    logits_from: str | None = None


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
    return (hidden, indices.to(old_i.dtype).reshape(old_i.shape).contiguous(),
            weights.to(old_w.dtype).reshape(old_w.shape).contiguous(), *rest), kwargs


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
    """Every floating-point parameter and buffer to ``dtype`` (complex ones, such as a complex
    RoPE cache, are left alone: ``model.to(bf16)`` would drop their imaginary part), except the
    named tensors (candidate naming), which stay fp32 with their values untouched: the tensors
    the reference keeps in fp32 in its own bf16 checkpoint (a round trip through bf16 would
    round them, which its ``from_pretrained`` does not)."""
    import torch

    def named(m):
        found = dict(m.named_parameters(remove_duplicate=False))
        found.update(m.named_buffers(remove_duplicate=False))
        return found

    kept = {name: t.detach().to(torch.float32).clone() for name, t in named(model).items()
            if name in keep_fp32 and t.is_floating_point()}
    model = model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    after = named(model)
    for name, value in kept.items():
        after[name].data = value
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


@dataclass(frozen=True)
class ExpertParallel:
    """Expert parallelism: how the plugin shards its candidate, and its distributed training
    pieces. Declared as ``ArchSpec(expert_parallel=ExpertParallel(shard=...))``; without it the
    ``expert_parallel`` checks report "not applicable".

    The ``expert_parallel`` family starts ``world_size`` processes (torch.distributed: gloo on
    CPU, NCCL with one GPU per rank), builds the full candidate in each from the same converted
    checkpoint, and calls ``shard(model, rank, world_size, group) -> model``: the rank's
    expert-parallel shard, its collectives over ``group`` (a torch.distributed process group of
    ``world_size`` ranks; ``rank`` is the rank in it: use the group, not the default group).
    Each rank then runs its own rows of the batch (data parallel across the group, experts
    split across it). The shard keeps:

    - the candidate's forward convention, on the rank's rows only;
    - the module names that ``Probes.pairs`` declares for routers and experts, so the probes
      read and drive the shard as they do the full model: its experts module takes the rank's
      tokens with their choices (any expert of the whole model) and returns their weighted sum,
      wherever the chosen experts live;
    - every tensor of the full candidate's state, on some rank: ``locate(shard, name) ->
      (full_name, rows)`` says where the shard's tensor ``name`` sits in the full candidate's
      state: ``rows`` a ``slice`` of the full tensor's first dimension (an expert-sharded
      tensor) or None (the whole tensor, replicated). None: same names, and a tensor whose
      first dimension is shorter than the full one's holds contiguous rows in rank order.

    Training, as the team's trainer runs it (each optional; a check needing one that is not
    declared reports "not applicable"):

    - ``reduce_gradients(shard, group)``: called after backward. Each rank's loss is its share
      of the group's batch loss (summed over the ranks it is the loss of the whole batch), so
      after this call every gradient must be the whole batch's: replicated parameters summed
      over the group, expert shards complete. None: the shard reduces them itself in backward
      (e.g. DDP hooks).
    - ``aux_loss(router_logits, top_k, attention_mask, group) -> scalar``: the rank's share of
      the load-balancing loss of the group's whole batch (``TrainingHooks.aux_loss``'s
      definition, its statistics all-reduced over the group): summed over the ranks it is the
      single-process aux loss of the whole batch. ``router_logits``: the rank's MoE layers'
      [T, E] logits as the probes read them; ``attention_mask``: the rank's rows.
    - ``bias_update(bias, local_load, rate, group)``: the aux-loss-free balancing update of
      one layer's selection bias, in place, from the rank's own tokens per expert
      (``local_load`` [E], padding excluded): the load of the group's whole batch must be used
      (all-reduced before the update), so every rank ends with the single-process update's bias.

    ``timeout``: seconds the ranks may take once started; a rank that hangs past it (or exits)
    fails the checks naming it, and every process of the launch is killed.
    """

    shard: Callable[[Any, int, int, Any], Any]
    locate: Callable[[Any, str], tuple[str, Any]] | None = None
    reduce_gradients: Callable[[Any, Any], None] | None = None
    aux_loss: Callable[..., Any] | None = None
    bias_update: Callable[..., None] | None = None
    timeout: float = 120.0
