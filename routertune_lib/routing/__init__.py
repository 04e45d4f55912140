"""Routers that let decoder layers skip attention, MLP or the whole block, per sequence or per token.

A granularity is two fields: ``target`` in {attn, mlp, block} chooses which sub-layers a router gates, ``level`` in
{sequence, token} chooses what one decision covers. Targets are registered (``register_target``): ``routing.model``
registers attn, mlp and block; ``routertune_lib.moe`` registers ``experts``. Every routed layer runs the same code path:

    x      = pre_attn_norm(h)                       # [B, T, d]   what attention sees; the router reads it
    score  = sigmoid(router(x))                     # [B, T]      token level
           | sigmoid(router(mean_real_tokens(x)))   # [B]         sequence level (padding excluded)
    keep   = score >= threshold                     # hard 0/1 decision, no soft weighting
    h      = h + keep * F(h)                        # for each gated sub-layer F

Sequence-level decisions are made at prefill and stored in the KV cache layer, so every decode step reuses its
sequence's prefill decision. Without a cache there is nowhere to keep it, so ``generate(use_cache=False)`` on a
sequence-routed model raises (each step would re-decide on prompt + generated tokens). Routed models run with
``DynamicCache`` (generate's default) only; static, offloaded and quantized caches raise. Decisions and statistics
of one forward travel in a ``RoutingContext`` that a forward pre-hook passes to the layers and a forward hook returns
as ``output.routing`` (a ``RoutingTrace``).

Modules: ``config`` (``RouterConfig``, the target registry), ``trace`` (``RoutingContext``, ``RoutingTrace``),
``layer`` (the routed decoder layer and its execution modes), ``model`` (attach/detach, thresholds, modes),
``checkpoint`` (save/load). Importing the package registers the attn, mlp and block targets and the
``save_pretrained`` restorer.
"""

from .config import (CAPACITY_LOSSES, CHECKPOINT_FORMAT, LEVELS, MODES, RouterConfig, RoutingTarget, register_target,
                     routing_targets)
from .trace import LayerDecision, RoutingContext, RoutingTrace
from .layer import LayerRouting, RoutedCacheMixin, RoutedLayerMixin, mixed_class, trains_router
from .model import (RoutingSetup, attach_routers, detach_routers, load_router_state, routed_layers, router_parameters,
                    router_state, routing_mode, routing_post_hook, routing_pre_hook, set_routing_mode, set_thresholds,
                    zero_router)
from .checkpoint import load_routers, restore_routers, save_routers

__all__ = [
    "CAPACITY_LOSSES", "CHECKPOINT_FORMAT", "LEVELS", "MODES", "LayerDecision", "LayerRouting", "RoutedCacheMixin",
    "RoutedLayerMixin", "RouterConfig", "RoutingContext", "RoutingSetup", "RoutingTarget", "RoutingTrace",
    "attach_routers", "detach_routers", "load_router_state", "load_routers", "mixed_class", "register_target",
    "restore_routers", "routed_layers", "router_parameters", "router_state", "routing_mode", "routing_post_hook",
    "routing_pre_hook", "routing_targets", "save_routers", "set_routing_mode", "set_thresholds", "trains_router",
    "zero_router",
]
