"""Reading and forcing routing decisions through the declared probes (moe_conformance.contract).

Both sides are read the same way: the reference with transformers' conventions (the default
probes), the candidate with the probes its plugin declares. Where a router is and which layer
it belongs to come from the module pairs with role ``router`` / ``experts``; what its output
means comes from the probe. Every check that looks at routing (router gradients, aux loss,
routing margins, the routing-pinned diagnostic, engines' routing reports, force-routing) goes
through :class:`RoutingTap` and :func:`forced_routing`, so no check assumes a return-value
order, an attribute or a module name the plugin did not declare.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .contract import ExpertsProbe, ProbeError, Probes, RouterProbe, RouterReading

REFERENCE_PROBES = Probes()  # transformers: (logits, weights, indices) routers, (x, idx, w) experts


@dataclass(frozen=True)
class RoutingLayer:
    layer: int | None
    router: str | None  # module name on this side, None when the layer's router is not declared
    experts: str | None


def probes_of(case, side: str) -> Probes:
    if side == "ref":
        return getattr(case.spec, "reference_probes", None) or REFERENCE_PROBES
    return case.spec.probes


def routing_layers(case, side: str, model: torch.nn.Module | None = None) -> list[RoutingLayer]:
    """The MoE layers of one side (``ref`` or ``cand``) in layer order, from the module pairs
    with role router/experts; with ``model``, only the modules it has (dense layers have none)."""
    present = set(dict(model.named_modules())) if model is not None else None
    by_layer: dict[int | None, dict[str, str]] = {}
    for p in case.module_pairs():
        if p.role not in ("router", "experts"):
            continue
        name = p.ref if side == "ref" else p.cand
        if present is not None and name not in present:
            continue
        by_layer.setdefault(p.layer, {})[p.role] = name
    order = sorted(by_layer, key=lambda i: -1 if i is None else i)
    return [RoutingLayer(i, by_layer[i].get("router"), by_layer[i].get("experts")) for i in order]


def _rows(t, width: int | None = None):
    if t is None:
        return None
    return t.reshape(-1, t.shape[-1]) if width is None else t.reshape(-1, width)


class RoutingTap:
    """Records every MoE layer's :class:`RouterReading` during a forward (graph attached), read
    through the side's probes: the router's output, completed by the choice the experts module
    receives where the router module only scores."""

    def __init__(self, model: torch.nn.Module, case, side: str):
        self.side = side
        self.layers = routing_layers(case, side, model)
        if not self.layers:
            declared = [(p.ref, p.cand) for p in case.module_pairs() if p.role in ("router", "experts")]
            raise ProbeError(
                f"no router or experts module of the {'reference' if side == 'ref' else 'candidate'} found: "
                + (f"declared pairs {declared[:3]} name modules the model does not have" if declared else
                   "declare ModulePair(ref, cand, role='router') (and role='experts') in Probes.pairs"))
        probes = probes_of(case, side)
        self.router_probe: RouterProbe | None = probes.router
        self.experts_probe: ExpertsProbe | None = probes.experts
        modules = dict(model.named_modules())
        self._routers = {l.layer: modules[l.router] for l in self.layers if l.router}
        self._experts = {l.layer: modules[l.experts] for l in self.layers if l.experts}
        child = self.router_probe.logits_from if self.router_probe is not None else None
        self._logits = {i: modules[f"{l.router}.{child}"] for i, l in ((l.layer, l) for l in self.layers)
                        if child and l.router and f"{l.router}.{child}" in modules}
        self.readings: dict[int | None, RouterReading] = {}
        self.errors: list[str] = []

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """The router modules by name (layers whose router is declared), in layer order."""
        return {l.router: self._routers[l.layer] for l in self.layers if l.router}

    def _on_router(self, layer):
        def hook(module, args, output):
            if self.router_probe is None:
                return
            try:
                reading = self.router_probe.read(output)
            except Exception as exc:  # noqa: BLE001 - reported by the contract check, not a crash here
                self.errors.append(f"router probe on {self._name(layer, 'router')}: {type(exc).__name__}: {exc}")
                return
            self.readings[layer] = _merge(self.readings.get(layer), reading)
        return hook

    def _on_logits(self, layer):
        def hook(module, args, output):
            self.readings[layer] = _merge(self.readings.get(layer), RouterReading(logits=output))
        return hook

    def _on_experts(self, layer):
        def hook(module, args, kwargs):
            if self.experts_probe is None or self.experts_probe.read_choice is None:
                return
            seen = self.readings.get(layer)
            if seen is not None and seen.indices is not None:
                return
            try:
                indices, weights = self.experts_probe.read_choice(args, kwargs)
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"experts probe on {self._name(layer, 'experts')}: {type(exc).__name__}: {exc}")
                return
            self.readings[layer] = _merge(seen, RouterReading(indices=indices, weights=weights))
        return hook

    def _name(self, layer, role) -> str:
        found = next((l for l in self.layers if l.layer == layer), None)
        return getattr(found, role, None) or f"layer {layer}"

    @contextmanager
    def __call__(self) -> Iterator[RoutingTap]:
        self.readings, self.errors = {}, []
        handles = [m.register_forward_hook(self._on_logits(i)) for i, m in self._logits.items()]
        handles += [m.register_forward_hook(self._on_router(i)) for i, m in self._routers.items()]
        handles += [m.register_forward_pre_hook(self._on_experts(i), with_kwargs=True) for i, m in self._experts.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    # ---- what was read, in layer order
    def ordered(self) -> list[RouterReading]:
        if self.errors:
            raise ProbeError(self.errors[0])
        return [self.readings[l.layer] for l in self.layers if l.layer in self.readings]

    def _field(self, name: str, what: str) -> tuple[torch.Tensor, ...]:
        readings = self.ordered()
        missing = [l for l, r in zip(self.layers, readings) if getattr(r, name) is None]
        if missing or not readings:
            raise ProbeError(f"the {'reference' if self.side == 'ref' else 'candidate'}'s routing probes give no "
                             f"{what} (layer {missing[0].layer if missing else '?'}): declare a RouterProbe whose "
                             f"read() returns RouterReading({name}=...)")
        return tuple(_rows(getattr(r, name)) for r in readings)

    @property
    def logits(self) -> tuple[torch.Tensor, ...]:
        return self._field("logits", "router logits")

    @property
    def indices(self) -> tuple[torch.Tensor, ...]:
        return self._field("indices", "expert indices")

    @property
    def weights(self) -> tuple[torch.Tensor, ...]:
        return self._field("weights", "routing weights")

    def has(self, name: str) -> bool:
        readings = self.ordered()
        return bool(readings) and all(getattr(r, name) is not None for r in readings)


def _merge(seen: RouterReading | None, new: RouterReading) -> RouterReading:
    if seen is None:
        return new
    return RouterReading(*(a if a is not None else b for a, b in
                           zip((seen.indices, seen.weights, seen.logits, seen.scores),
                               (new.indices, new.weights, new.logits, new.scores))))


Chooser = Callable[[int | None, RouterReading], RouterReading]


@contextmanager
def forced_routing(model: torch.nn.Module, case, side: str, choose: Chooser) -> Iterator[None]:
    """Replace every MoE layer's decision by ``choose(layer, natural_reading)`` (indices and
    weights), at the router when its probe can force, else at the experts' input."""
    probes = probes_of(case, side)
    modules = dict(model.named_modules())
    handles = []
    captured: dict[int | None, RouterReading] = {}
    try:
        for layer in routing_layers(case, side, model):
            router = modules.get(layer.router) if layer.router else None
            experts = modules.get(layer.experts) if layer.experts else None
            rp, ep = probes.router, probes.experts
            logits_child = modules.get(f"{layer.router}.{rp.logits_from}") if (rp is not None and rp.logits_from
                                                                                and layer.router) else None
            if logits_child is not None:  # the router's output has no logits: its child's output is them
                def logits_of(mod, args, output, i=layer.layer):
                    captured[i] = _merge(RouterReading(logits=output), captured.get(i) or RouterReading())
                handles.append(logits_child.register_forward_hook(logits_of))
            if router is not None and rp is not None and rp.force is not None:
                def at_router(mod, args, output, i=layer.layer, rp=rp):
                    return rp.force(output, choose(i, _merge(rp.read(output), captured.pop(i, None) or RouterReading())))
                handles.append(router.register_forward_hook(at_router))
            elif experts is not None and ep is not None and ep.force_choice is not None and ep.read_choice is not None:
                if router is not None and rp is not None:  # keep what the router scored, for the chooser
                    def capture(mod, args, output, i=layer.layer, rp=rp):
                        captured[i] = _merge(rp.read(output), captured.get(i) or RouterReading())
                    handles.append(router.register_forward_hook(capture))

                def at_experts(mod, args, kwargs, i=layer.layer, ep=ep):
                    indices, weights = ep.read_choice(args, kwargs)
                    natural = _merge(RouterReading(indices=indices, weights=weights), captured.pop(i, None) or RouterReading())
                    forced = choose(i, natural)
                    return ep.force_choice(args, kwargs, forced.indices, forced.weights)
                handles.append(experts.register_forward_pre_hook(at_experts, with_kwargs=True))
            else:
                raise ProbeError(f"cannot force routing in layer {layer.layer}: declare RouterProbe(force=...) or "
                                 f"ExpertsProbe(read_choice=..., force_choice=...)")
        yield
    finally:
        for h in handles:
            h.remove()


def can_force(case, side: str = "cand") -> str | None:
    """Why routing cannot be forced on this side (None: it can)."""
    probes = probes_of(case, side)
    if probes.router is not None and probes.router.force is not None:
        return None
    e = probes.experts
    if e is not None and e.force_choice is not None and e.read_choice is not None:
        return None
    return "neither RouterProbe.force nor ExpertsProbe.force_choice is declared"
