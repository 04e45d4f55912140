"""Router settings: the registry of routing targets (``register_target``) and ``RouterConfig``, plus the input
validators the routing modules share."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields

LEVELS = ("sequence", "token")
MODES = ("real", "masked")
CAPACITY_LOSSES = ("hinge", "linear", "dual")
CHECKPOINT_FORMAT = "routertune-routers/1"


def check_real(value, name: str) -> float:
    """``value`` as a finite float: Python, numpy or 0-d tensor numbers (not bools or strings); ``ValueError``
    naming ``name`` otherwise."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r} ({type(value).__name__}); pass e.g. 0.5")
    return float(value)


def check_index(value, name: str) -> int:
    """``value`` as a non-negative int (Python or numpy integers, not bools); ``ValueError`` naming ``name``
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__})")
    return int(value)


# ----------------------------------------------------------------------------------------------------------------
# Routing targets: what attach_routers does for each RouterConfig.target


@dataclass(frozen=True)
class RoutingTarget:
    """A registered ``RouterConfig.target``.

    attach: ``attach(model, config, *, static_drop) -> model`` adds the routers in place and sets ``model.routertune``
        (a ``RoutingSetup``) and the forward hooks (``routing_pre_hook`` / ``routing_post_hook``).
    levels: the ``RouterConfig.level`` values the target supports.
    """

    name: str
    attach: Callable
    levels: tuple[str, ...] = LEVELS


TARGETS: dict[str, RoutingTarget] = {}  # the registry: {target name: RoutingTarget}; add with register_target


def register_target(name: str, attach: Callable, levels: tuple[str, ...] = LEVELS) -> None:
    """Make ``RouterConfig(target=name)`` valid and ``attach_routers`` call ``attach`` for it.

    ``attn``, ``mlp`` and ``block`` are registered by ``routing.model``; ``routertune_lib.moe`` registers ``experts``
    (the package imports it, so it is registered whenever ``routertune_lib`` is imported).
    """
    if name in TARGETS and TARGETS[name].attach is not attach:
        raise ValueError(f"routing target {name!r} is already registered by {TARGETS[name].attach.__module__}")
    bad = [lv for lv in levels if lv not in LEVELS]
    if not levels or bad:
        raise ValueError(f"routing target {name!r}: levels must be a non-empty subset of {LEVELS}, got {levels!r}")
    TARGETS[name] = RoutingTarget(name, attach, tuple(levels))


def routing_targets() -> tuple[str, ...]:
    """The registered ``RouterConfig.target`` values."""
    return tuple(TARGETS)


@dataclass
class RouterConfig:
    """What is routed and how.

    target: a registered target (``routing_targets()``): the sub-layers one router gates, ``attn``, ``mlp`` or
        ``block`` (attention and MLP, one decision); or ``experts``: one token-level router per expert of each MoE
        block (registered by ``routertune_lib.moe``; level ``token``).
    level: ``sequence`` (one decision per sequence, made at prefill) or ``token`` (one per token).
    num_layers: route the ``n`` deepest layers except the last (0-based ``N-n-1 .. N-2``); default ``N // 2``.
    layers: explicit 0-based layer indices instead of ``num_layers``.
    threshold: execute when ``sigmoid(score) >= threshold``; in [0, 1].
    capacity: target executed fraction over routed layers (the ``s`` of the hinge capacity loss); in (0, 1].
    capacity_weight: the capacity loss weight ``lambda`` (with ``"dual"``: its starting value); >= 0.
    capacity_weight_lr: ``"dual"`` only: the multiplier's step per unit of capacity error per optimizer step; > 0.
    capacity_loss: the capacity term of the training loss, over the straight-through decisions of one forward:
        ``"hinge"`` (default; the paper's text): ``lambda * ReLU(c - capacity)``, ``c`` the executed fraction over
        all routed layers (``RoutingTrace.capacity``); zero at or below the target.
        ``"linear"`` (the released 2024 code, ``gradient_scale * mean(hard decision)`` per routed layer): ``lambda *
        sum over routed layers of c_l``, ``c_l`` the layer's executed fraction; no target (``capacity`` is unused),
        it pushes every layer's capacity down until the task loss balances it.
        ``"dual"`` (not in the paper; issue 15): ``lambda_t * (c - capacity)``, two-sided, with ``lambda_t`` a
        Lagrange multiplier that starts at ``capacity_weight`` and after every optimizer step moves by
        ``capacity_weight_lr * (c_t - capacity)`` (``c_t`` the step's executed fraction; it may turn negative, which
        pushes towards executing). Under Adam a layer's logit moves by the sign of ``lambda * push - pull`` alone,
        so a fixed ``lambda`` keeps whichever layers' task pull exceeds it; the multiplier instead rises or falls
        until the executed fraction sits at the target.
    router_bias: give each router a learnable, zero-initialised bias (per routed layer; per expert for ``experts``), so
        a layer can move its scores as a whole relative to the threshold. ``False`` (default): ``Linear(d, n,
        bias=False)``, the routers of the paper's method as implemented so far. Either way a fresh router scores 0.5.
    """

    target: str = "attn"
    level: str = "sequence"
    num_layers: int | None = None
    layers: list[int] | None = None
    threshold: float = 0.5
    capacity: float = 0.5
    capacity_weight: float = 0.1
    capacity_loss: str = "hinge"
    capacity_weight_lr: float = 2.0
    router_bias: bool = False

    def __post_init__(self):
        target = TARGETS.get(self.target)
        if target is None:
            raise ValueError(f"RouterConfig.target must be one of the registered targets {routing_targets()}, got "
                             f"{self.target!r} (expert routers register 'experts' with `import routertune_lib.moe`)")
        if self.level not in LEVELS:
            raise ValueError(f"RouterConfig.level must be one of {LEVELS}, got {self.level!r}")
        if self.level not in target.levels:
            raise ValueError(f"RouterConfig.target={self.target!r} supports level {target.levels}: level must be "
                             f"{' or '.join(repr(lv) for lv in target.levels)}, got {self.level!r}")
        if self.num_layers is not None and self.layers is not None:
            raise ValueError("RouterConfig: give either num_layers or layers, not both")
        n = self.num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise ValueError(f"RouterConfig.num_layers must be an integer >= 1, got {self.num_layers!r}")
        if self.num_layers is not None:
            self.num_layers = int(self.num_layers)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not self.layers:
                raise ValueError(f"RouterConfig.layers must be a non-empty list of 0-based indices, got {self.layers!r}")
            self.layers = [check_index(i, f"each of RouterConfig.layers {self.layers!r}") for i in self.layers]
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"RouterConfig.layers has duplicates: {self.layers!r}")
            self.layers = sorted(self.layers)
        self.threshold = check_real(self.threshold, "RouterConfig.threshold")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"RouterConfig.threshold must be in [0, 1], got {self.threshold!r}")
        self.capacity = check_real(self.capacity, "RouterConfig.capacity")
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"RouterConfig.capacity must be in (0, 1], got {self.capacity!r}")
        self.capacity_weight = check_real(self.capacity_weight, "RouterConfig.capacity_weight")
        if self.capacity_weight < 0:
            raise ValueError(f"RouterConfig.capacity_weight must be >= 0, got {self.capacity_weight!r}")
        if self.capacity_loss not in CAPACITY_LOSSES:
            raise ValueError(f"RouterConfig.capacity_loss must be one of {CAPACITY_LOSSES} ('hinge': the paper's "
                             f"ReLU(capacity - target), 'linear': the released code's summed per-layer capacity, "
                             f"'dual': a multiplier adapted until the capacity sits at the target), got "
                             f"{self.capacity_loss!r}")
        self.capacity_weight_lr = check_real(self.capacity_weight_lr, "RouterConfig.capacity_weight_lr")
        if self.capacity_weight_lr <= 0:
            raise ValueError(f"RouterConfig.capacity_weight_lr must be > 0, got {self.capacity_weight_lr!r}")
        if not isinstance(self.router_bias, bool):
            raise ValueError(f"RouterConfig.router_bias must be True or False, got {self.router_bias!r}")

    def resolve_layers(self, num_hidden_layers: int) -> list[int]:
        """The routed layer indices for a model with ``num_hidden_layers`` layers."""
        if self.layers is not None:
            bad = [i for i in self.layers if i >= num_hidden_layers]
            if bad:
                raise ValueError(f"RouterConfig.layers {bad} out of range: the model has {num_hidden_layers} layers")
            return list(self.layers)
        n = self.num_layers if self.num_layers is not None else num_hidden_layers // 2
        if n > num_hidden_layers - 1:
            raise ValueError(
                f"RouterConfig.num_layers must be in [1, {num_hidden_layers - 1}] for a {num_hidden_layers}-layer "
                f"model (the last layer is never routed), got {n}"
            )
        return list(range(num_hidden_layers - n - 1, num_hidden_layers - 1))

    @classmethod
    def from_dict(cls, d: dict) -> "RouterConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown RouterConfig fields {sorted(unknown)}; valid fields: {sorted(known)}")
        return cls(**d)
