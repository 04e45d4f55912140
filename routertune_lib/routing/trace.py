"""Per-forward routing state: the ``RoutingContext`` a forward gives its routed layers, and the ``RoutingTrace`` of
``LayerDecision`` s they fill (returned as ``output.routing``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import MODES


@dataclass
class LayerDecision:
    """One routed layer's decision in one forward.

    keep: ``[B]`` (sequence) or ``[B, T]`` (token); 1.0 executed, 0.0 skipped. In training it carries the
        straight-through gradient to the router.
    weight: same shape; 1.0 for inputs that count in statistics (real tokens; sequences).
    score: router probabilities, same shape, or ``None`` when the decision was reused from the cache or fixed.
    """

    layer: int
    keep: torch.Tensor
    weight: torch.Tensor
    score: torch.Tensor | None


@dataclass
class RoutingTrace:
    """Decisions of all routed layers in one forward (``output.routing``)."""

    decisions: list[LayerDecision] = field(default_factory=list)

    def capacity(self) -> torch.Tensor:
        """Executed fraction over all routed layers and counted inputs; a scalar that keeps the STE gradient."""
        if not self.decisions:
            return torch.tensor(1.0)
        num = sum((d.keep * d.weight).sum() for d in self.decisions)
        den = sum(d.weight.sum() for d in self.decisions)
        return num / den.clamp_min(1.0)

    def layer_capacities(self) -> dict[int, torch.Tensor]:
        """Executed fraction per routed layer, ``{layer: scalar}``, keeping the STE gradient."""
        return {d.layer: (d.keep * d.weight).sum() / d.weight.sum().clamp_min(1.0) for d in self.decisions}

    def executed_fraction(self) -> dict[int, float]:
        """Executed fraction per routed layer, ``{layer_index: fraction}``."""
        return {i: float(c.detach()) for i, c in self.layer_capacities().items()}

    def counts(self, token_level_only: bool = False) -> dict[int, tuple[float, float]]:
        """``{layer: (executed, total)}`` input counts, for accumulating statistics over many forwards.

        token_level_only: leave out sequence decisions (``keep`` of shape ``[B]``), e.g. in a forward that continues
        cached sequences, whose sequence decisions were counted when they were made.
        """
        counts: dict[int, tuple[float, float]] = {}
        for d in self.decisions:
            if token_level_only and d.keep.dim() == 1:
                continue
            e, n = counts.get(d.layer, (0.0, 0.0))
            counts[d.layer] = (e + float((d.keep.detach() * d.weight).sum()), n + float(d.weight.sum()))
        return counts


@dataclass
class RoutingContext:
    """Inputs shared by the routed layers of one forward, plus the trace they fill.

    mode: how a forward without router gradients executes, ``real`` or ``masked``.
    attention_mask: the call's 2-D padding mask ``[B, S]`` (1 = real token, covering past and current tokens) or
        ``None`` (every token is real).
    training_forward: how a layer whose router is being trained executes, ``masked`` (all inputs, output x STE
        decision) or ``real`` (kept inputs only, output x STE decision); see ``routing.layer``.
    calibrate: per-layer threshold calibration in one forward (``calibration.calibrate_thresholds``): called by
        each routed layer, just before it decides, with its index and its router scores of the real inputs (1-D);
        returns the threshold the layer sets and decides with. Layers before it have already set theirs.
    """

    mode: str
    attention_mask: torch.Tensor | None
    trace: RoutingTrace
    training_forward: str = "masked"
    calibrate: Callable[[int, torch.Tensor], float] | None = None
    _masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # token_mask's, per shape

    def __post_init__(self):
        for name in ("mode", "training_forward"):
            if getattr(self, name) not in MODES:
                raise ValueError(f"RoutingContext.{name} must be one of {MODES}, got {getattr(self, name)!r}")

    def runs_masked(self, training_router: bool) -> bool:
        """Whether a routed module runs masked: ``training_forward`` while its router trains, else ``mode``."""
        return (self.training_forward if training_router else self.mode) == "masked"

    def token_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool mask of the real tokens among the ``T`` tokens of this forward (made once per forward
        and device, for all routed layers)."""
        return self._token_masks(hidden)[0]

    def token_weight(self, hidden: torch.Tensor) -> torch.Tensor:
        """``token_mask`` as floats, the weight of token-level decisions in the trace."""
        return self._token_masks(hidden)[1]

    def _token_masks(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = hidden.shape[:2]
        key = (B, T, hidden.device)
        if key not in self._masks:
            if self.attention_mask is None:
                mask = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
            else:
                mask = self.attention_mask[:, -T:].to(device=hidden.device, dtype=torch.bool)
            self._masks[key] = mask, mask.float()
        return self._masks[key]
