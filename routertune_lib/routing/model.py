"""Attaching routers to a model and working with them: ``attach_routers`` / ``detach_routers`` (and the ``attn``,
``mlp``, ``block`` targets), the forward hooks, router parameters and state, thresholds and execution modes."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..architectures import arch_spec, decoder_layers
from .config import CHECKPOINT_FORMAT, MODES, TARGETS, RouterConfig, check_index, check_real, register_target
from .layer import LayerRouting, RoutedLayerMixin, mixed_class
from .trace import RoutingContext, RoutingTrace


@dataclass
class RoutingSetup:
    """What ``attach_routers`` did to a model (``model.routertune``). ``mode`` is the inference execution mode.

    module_path: where the routers live inside each routed decoder layer (``None``: the layer itself; e.g.
        ``mlp.experts`` for expert routers); ``routed_layers`` returns those modules.
    """

    config: RouterConfig
    layers: list[int]
    static: bool
    mode: str = "real"
    hooks: list = field(default_factory=list, repr=False)
    module_path: str | None = None


def routing_pre_hook(model, args, kwargs):
    """Model forward pre-hook: refuse caches other than ``DynamicCache`` (decoder-layer routers), and give the forward
    a ``RoutingContext`` (``model.routertune.mode``) unless it has one."""
    cache = kwargs.get("cache", kwargs.get("past_key_values", args[3] if len(args) > 3 else None))
    layer_routers = model.routertune.module_path is None  # expert routers (moe) leave the cache alone
    if layer_routers and cache is not None and not (type(cache) is DynamicCache and not cache.offloading):
        raise ValueError(
            f"Routed models support only a DynamicCache (generate's default, cache_implementation='dynamic'), "
            f"not {type(cache).__name__}{' with offloading' if type(cache) is DynamicCache else ''}: routed layers "
            "store per-sequence decisions and compact K/V in their cache layers. Drop cache_implementation / pass "
            "a DynamicCache()."
        )
    if "routing_context" not in kwargs:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        kwargs["routing_context"] = RoutingContext(model.routertune.mode, mask, RoutingTrace())
    return args, kwargs


def routing_post_hook(model, args, kwargs, output):
    """Model forward hook: return the forward's ``RoutingTrace`` as ``output.routing``."""
    output["routing"] = kwargs["routing_context"].trace
    return output


def _generate_keeping_decisions(model, *args, **kwargs):
    """``model.generate`` of a model with sequence-level routers: refuses ``use_cache=False``, under which every step
    would re-decide on the prompt plus the tokens generated so far instead of keeping the prefill decision."""
    config = kwargs.get("generation_config") or model.generation_config
    if not kwargs.get("use_cache", config.use_cache):
        raise ValueError(
            "generate(use_cache=False) is not supported with sequence-level routers: the decision made on the "
            "prompt is kept in the KV cache for every decode step, and without a cache each step would re-decide "
            "on the prompt plus the generated tokens. Generate with use_cache=True (the default)."
        )
    return type(model).generate(model, *args, **kwargs)


def router_record(model: nn.Module) -> dict:
    """The routers' settings besides their weights: checkpoint format, ``RouterConfig``, static drop, thresholds."""
    setup = _setup(model)
    thresholds = {str(i): layer.routing.threshold for i, layer in routed_layers(model).items()}
    return {"format": CHECKPOINT_FORMAT, "config": asdict(setup.config), "static_drop": setup.static,
            "thresholds": thresholds}


def _record_in_config(model: nn.Module) -> None:
    """Keep ``model.config.routertune`` equal to the router record, so ``save_pretrained`` writes it to config.json
    (the router weights are in the state dict) and ``models.load_model`` re-attaches the routers."""
    model.config.routertune = router_record(model)


def attach_routers(model: nn.Module, config: RouterConfig, *, static_drop: bool = False) -> nn.Module:
    """Add routers for ``config.target`` to ``model``, in place; returns ``model``.

    Dispatches to the target's registered ``attach`` (``register_target``). For ``attn`` / ``mlp`` / ``block`` each
    routed layer gets a zero-initialised ``Linear(d, 1, bias=config.router_bias)`` router; with ``static_drop=True``
    the selected layers get no router and are always skipped (the paper's Layer Drop / Attention Drop baseline),
    through the same real-skip path. Zero routers score every input 0.5 >= threshold 0.5, so a freshly routed model
    computes exactly the dense model. ``experts`` attaches expert routers to the MoE blocks
    (``moe.attach_expert_routers``). With sequence-level routers, ``model.generate`` refuses ``use_cache=False``
    (the cache keeps the prefill decision). The router record is kept in ``model.config.routertune`` (so
    ``save_pretrained`` / ``models.load_model`` round-trip it).
    """
    if getattr(model, "routertune", None) is not None:
        raise ValueError("This model already has routers; call detach_routers(model) first.")
    TARGETS[config.target].attach(model, config, static_drop=static_drop)
    _record_in_config(model)
    return model


def zero_router(in_features: int, out_features: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    """A router ``Linear(in_features, out_features, bias=bias)`` with every parameter zero (it scores every input
    0.5), on ``like``'s device and dtype."""
    router = nn.Linear(in_features, out_features, bias=bias, device=like.device, dtype=like.dtype)
    for p in router.parameters():
        nn.init.zeros_(p)
    return router


def _attach_layer_routers(model: nn.Module, config: RouterConfig, *, static_drop: bool) -> nn.Module:
    """``attach_routers`` for the decoder-layer targets ``attn``, ``mlp`` and ``block``."""
    arch = arch_spec(model)
    layers = decoder_layers(model)
    indices = config.resolve_layers(len(layers))
    for i in indices:
        layer = layers[i]
        ref = next(layer.parameters())
        layer.__class__ = mixed_class(RoutedLayerMixin, type(layer))
        layer.routing = LayerRouting(
            i, config.target, config.level, config.threshold, arch, fixed_keep=False if static_drop else None
        )
        layer.router = None if static_drop else zero_router(model.config.hidden_size, 1, config.router_bias, ref)
    setup = RoutingSetup(config=config, layers=indices, static=static_drop)
    setup.hooks = [
        model.register_forward_pre_hook(routing_pre_hook, with_kwargs=True),
        model.register_forward_hook(routing_post_hook, with_kwargs=True),
    ]
    model.routertune = setup
    if config.level == "sequence":
        model.generate = functools.partial(_generate_keeping_decisions, model)
    return model


register_target("attn", _attach_layer_routers)
register_target("mlp", _attach_layer_routers)
register_target("block", _attach_layer_routers)


def detach_routers(model: nn.Module) -> nn.Module:
    """Remove routers and hooks, restoring the plain model in place; returns ``model``."""
    setup = _setup(model)
    for h in setup.hooks:
        h.remove()
    for layer in routed_layers(model).values():
        del layer.router, layer.routing
        layer.__class__ = type(layer).__bases__[1]
    model.__dict__.pop("generate", None)
    model.config.__dict__.pop("routertune", None)
    model.routertune = None
    return model


def _setup(model) -> RoutingSetup:
    setup = getattr(model, "routertune", None)
    if setup is None:
        raise ValueError("This model has no routers; call attach_routers(model, RouterConfig(...)) first.")
    return setup


def routed_layers(model: nn.Module) -> dict[int, nn.Module]:
    """``{layer_index: routed module}``: the decoder layer, or its ``RoutingSetup.module_path`` submodule (expert
    routers); each carries ``router`` and ``routing`` (with ``threshold``)."""
    setup = _setup(model)
    layers = decoder_layers(model)
    if setup.module_path is None:
        return {i: layers[i] for i in setup.layers}
    return {i: layers[i].get_submodule(setup.module_path) for i in setup.layers}


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The router parameters (weight, and bias with ``RouterConfig.router_bias``), in layer order (the only
    parameters Router-Tuning trains)."""
    return [p for layer in routed_layers(model).values() if layer.router is not None for p in layer.router.parameters()]


def router_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"layers.<i>.router.<weight|bias>": float32 CPU tensor}``: what ``save_routers`` stores."""
    return {f"layers.{i}.router.{name}": p.detach().float().cpu().contiguous()
            for i, layer in routed_layers(model).items() if layer.router is not None
            for name, p in layer.router.named_parameters()}


def load_router_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``router_state`` tensors into the model's routers (same routed layers and router shapes)."""
    for i, layer in routed_layers(model).items():
        if layer.router is not None:
            layer.router.load_state_dict({name: tensors[f"layers.{i}.router.{name}"]
                                          for name, _ in layer.router.named_parameters()})


def _threshold(value, name: str) -> float:
    t = check_real(value, name)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return t


def _layer_key(key) -> int:
    """A per-layer threshold key: an int, or its digit string (what a JSON round trip makes of int keys)."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return check_index(key, "a threshold's layer key")


def set_thresholds(model: nn.Module, thresholds: float | Mapping[int | str, float]) -> None:
    """Set the decision threshold globally (a number) or per routed layer (``{layer: threshold}``; layers left out
    keep theirs). Numbers may be numpy or 0-d tensor scalars; keys may be digit strings (``calibrate_thresholds``'
    output after a JSON round trip). A key that is not a routed layer raises ``ValueError``."""
    layers = routed_layers(model)
    if isinstance(thresholds, Mapping):
        per_layer = {_layer_key(k): _threshold(t, f"threshold for layer {k!r}") for k, t in thresholds.items()}
        unrouted = sorted(set(per_layer) - set(layers))
        if unrouted:
            raise ValueError(f"thresholds given for layers {unrouted}, which are not routed; routed layers: "
                             f"{sorted(layers)}")
    else:
        per_layer = dict.fromkeys(layers, _threshold(thresholds, "threshold"))
    for i, t in per_layer.items():
        layers[i].routing = replace(layers[i].routing, threshold=t)
    if getattr(model.config, "routertune", None) is not None:  # expert drop plans are not recorded
        _record_in_config(model)


def set_routing_mode(model: nn.Module, mode: str) -> None:
    """Choose how inference executes routing: ``real`` (skipped work is not computed) or ``masked`` (reference)."""
    if mode not in MODES:
        raise ValueError(f"routing mode must be one of {MODES}, got {mode!r}")
    _setup(model).mode = mode


@contextlib.contextmanager
def routing_mode(model: nn.Module, mode: str):
    """Context manager form of ``set_routing_mode``; restores the previous mode on exit."""
    previous = _setup(model).mode
    set_routing_mode(model, mode)
    try:
        yield model
    finally:
        set_routing_mode(model, previous)
