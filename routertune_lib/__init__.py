"""routertune: Router-Tuning / MindSkip dynamic-depth routers for Hugging Face decoder models, with real skipping."""

from . import moe  # noqa: F401  (registers the "experts" routing target, so every import of the package has it)
from .models import load_model
from .routing import (
    RouterConfig,
    RoutingTrace,
    attach_routers,
    detach_routers,
    load_routers,
    router_parameters,
    routed_layers,
    routing_mode,
    save_routers,
    set_routing_mode,
    set_thresholds,
)

__all__ = [
    "RouterConfig",
    "RoutingTrace",
    "attach_routers",
    "detach_routers",
    "load_model",
    "load_routers",
    "router_parameters",
    "routed_layers",
    "routing_mode",
    "save_routers",
    "set_routing_mode",
    "set_thresholds",
]
