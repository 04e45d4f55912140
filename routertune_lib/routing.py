"""Routers that let decoder layers skip attention, MLP or the whole block, per sequence or per token.

A granularity is two fields: ``target`` in {attn, mlp, block} chooses which sub-layers a router gates, ``level`` in
{sequence, token} chooses what one decision covers. Targets are registered (``register_target``): this module
registers attn, mlp and block; ``routertune_lib.moe`` registers ``experts``. Every routed layer runs the same code path:

    x      = pre_attn_norm(h)                       # [B, T, d]   what attention sees; the router reads it
    score  = sigmoid(router(x))                     # [B, T]      token level
           | sigmoid(router(mean_real_tokens(x)))   # [B]         sequence level (padding excluded)
    keep   = score >= threshold                     # hard 0/1 decision, no soft weighting
    h      = h + keep * F(h)                        # for each gated sub-layer F

Two execution modes compute that last line:
- ``real`` (inference default): skipped rows/tokens are never given to F. Sequence level gathers the kept rows, runs
  F on them and scatters back; a sequence that skips attention writes no K/V at that layer (the layer's cache holds
  only the kept rows). Token level gathers kept tokens: the MLP runs on kept tokens only; attention computes queries,
  scores and the output projection for kept tokens only, while K/V are written for every token (skipped tokens stay
  visible to later tokens; this is the cheaper choice, and a decode step whose token is skipped reads no cache).
- ``masked``: F runs on everything and its output is multiplied by ``keep``. This is the reference the fast path is
  tested against.

While a router is trained (gradients enabled and its weight requires grad), ``keep = hard + score - score.detach()``
(value 0/1, gradient of ``score``: the straight-through estimator) and ``RoutingContext.training_forward`` chooses the
execution:
- ``masked`` (default): every input runs F and its output is multiplied by ``keep``, so the router's gradient is
  ``<dL/dh, F(h)>`` summed over kept and skipped inputs alike (a skipped input tells the router what executing it
  would have changed).
- ``real``: the real path above, with each kept input's output multiplied by ``keep`` (value 1); skipped inputs are
  not computed and give the router no task-loss gradient. This is the training forward of the released 2024 code
  (CASE-Lab-UMD/Router-Tuning, ``modeling_llama_mindskip.py``).

Sequence-level decisions are made at prefill and stored in the KV cache layer, so every decode step reuses its
sequence's prefill decision. Without a cache there is nowhere to keep it, so ``generate(use_cache=False)`` on a
sequence-routed model raises (each step would re-decide on prompt + generated tokens). Routed models run with
``DynamicCache`` (generate's default) only; static, offloaded and quantized caches raise. Decisions and statistics
of one forward travel in a ``RoutingContext`` that a forward pre-hook passes to the layers and a forward hook returns
as ``output.routing`` (a ``RoutingTrace``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import sys
from collections.abc import Mapping
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .architectures import ArchSpec, arch_spec, decoder_layers
from .models import model_identity, register_config_restorer
from .reporting import write_atomic

LEVELS = ("sequence", "token")
MODES = ("real", "masked")
CAPACITY_LOSSES = ("hinge", "linear")
CHECKPOINT_FORMAT = "routertune-routers/1"


def _real(value, name: str) -> float:
    """``value`` as a finite float: Python, numpy or 0-d tensor numbers (not bools or strings); ``ValueError``
    naming ``name`` otherwise."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r} ({type(value).__name__}); pass e.g. 0.5")
    return float(value)


def _index(value, name: str) -> int:
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


_TARGET_REGISTRY: dict[str, RoutingTarget] = {}


def register_target(name: str, attach: Callable, levels: tuple[str, ...] = LEVELS) -> None:
    """Make ``RouterConfig(target=name)`` valid and ``attach_routers`` call ``attach`` for it.

    ``attn``, ``mlp`` and ``block`` are registered here; ``routertune_lib.moe`` registers ``experts`` (the package
    imports it, so it is registered whenever ``routertune_lib`` is imported).
    """
    if name in _TARGET_REGISTRY and _TARGET_REGISTRY[name].attach is not attach:
        raise ValueError(f"routing target {name!r} is already registered by {_TARGET_REGISTRY[name].attach.__module__}")
    bad = [lv for lv in levels if lv not in LEVELS]
    if not levels or bad:
        raise ValueError(f"routing target {name!r}: levels must be a non-empty subset of {LEVELS}, got {levels!r}")
    _TARGET_REGISTRY[name] = RoutingTarget(name, attach, tuple(levels))


def routing_targets() -> tuple[str, ...]:
    """The registered ``RouterConfig.target`` values."""
    return tuple(_TARGET_REGISTRY)


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
    capacity_weight: the capacity loss weight ``lambda``; >= 0.
    capacity_loss: the capacity term of the training loss, over the straight-through decisions of one forward:
        ``"hinge"`` (default; the paper's text): ``lambda * ReLU(c - capacity)``, ``c`` the executed fraction over
        all routed layers (``RoutingTrace.capacity``); zero at or below the target.
        ``"linear"`` (the released 2024 code, ``gradient_scale * mean(hard decision)`` per routed layer): ``lambda *
        sum over routed layers of c_l``, ``c_l`` the layer's executed fraction; no target (``capacity`` is unused),
        it pushes every layer's capacity down until the task loss balances it.
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
    router_bias: bool = False

    def __post_init__(self):
        target = _TARGET_REGISTRY.get(self.target)
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
            self.layers = [_index(i, f"each of RouterConfig.layers {self.layers!r}") for i in self.layers]
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"RouterConfig.layers has duplicates: {self.layers!r}")
            self.layers = sorted(self.layers)
        self.threshold = _real(self.threshold, "RouterConfig.threshold")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"RouterConfig.threshold must be in [0, 1], got {self.threshold!r}")
        self.capacity = _real(self.capacity, "RouterConfig.capacity")
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"RouterConfig.capacity must be in (0, 1], got {self.capacity!r}")
        self.capacity_weight = _real(self.capacity_weight, "RouterConfig.capacity_weight")
        if self.capacity_weight < 0:
            raise ValueError(f"RouterConfig.capacity_weight must be >= 0, got {self.capacity_weight!r}")
        if self.capacity_loss not in CAPACITY_LOSSES:
            raise ValueError(f"RouterConfig.capacity_loss must be one of {CAPACITY_LOSSES} ('hinge': the paper's "
                             f"ReLU(capacity - target), 'linear': the released code's summed per-layer capacity), got "
                             f"{self.capacity_loss!r}")
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


# ----------------------------------------------------------------------------------------------------------------
# Per-forward state: context in, trace out


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
        decision) or ``real`` (kept inputs only, output x STE decision); see the module docstring.
    """

    mode: str
    attention_mask: torch.Tensor | None
    trace: RoutingTrace
    training_forward: str = "masked"

    def __post_init__(self):
        for name in ("mode", "training_forward"):
            if getattr(self, name) not in MODES:
                raise ValueError(f"RoutingContext.{name} must be one of {MODES}, got {getattr(self, name)!r}")

    def runs_masked(self, training_router: bool) -> bool:
        """Whether a routed module runs masked: ``training_forward`` while its router trains, else ``mode``."""
        return (self.training_forward if training_router else self.mode) == "masked"

    def token_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool mask of the real tokens among the ``T`` tokens of this forward."""
        B, T = hidden.shape[:2]
        if self.attention_mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        return self.attention_mask[:, -T:].to(device=hidden.device, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------------------
# KV cache: routed layers keep the prefill decision and, when attention is skipped per sequence, only kept rows


class RoutedCacheMixin:
    """Mixed into the cache layer of a sequence-routed layer at prefill (its own class is kept: full or sliding).

    keep_rows: ``[B]`` bool prefill decision, reused by every decode step.
    compact: True when K/V are stored for kept rows only (``keys: [K, kv_heads, S, head_dim]``, K = kept rows; a
        layer skipped by every row holds ``[0, kv_heads, S, head_dim]``: no memory, but it still knows ``S``).
    """

    keep_rows: torch.Tensor
    compact: bool

    def get_seq_length(self) -> int:
        if self.is_sliding:  # counts positions itself
            return super().get_seq_length()
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0

    def _batch_changes_unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "Sequence-level routing stores per-sequence decisions in the cache; beam search and other batch "
            "re-ordering are not supported. Use greedy decoding or sampling."
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = _batch_changes_unsupported


def mixed_class(mixin: type, cls: type, _made: dict = {}) -> type:
    """``class Routed<cls>(mixin, cls)``, made once per pair (what routed modules and cache layers become); its
    instances pickle through the pair."""
    if (mixin, cls) not in _made:
        _made[mixin, cls] = type(
            f"Routed{cls.__name__}", (mixin, cls), {"__module__": __name__, "__reduce_ex__": _reduce_mixed}
        )
    return _made[mixin, cls]


def _new_mixed(mixin: type, cls: type):
    """An empty instance of ``mixed_class(mixin, cls)``; pickle fills in its state."""
    made = mixed_class(mixin, cls)
    return made.__new__(made)


def _reduce_mixed(self, protocol):
    """Pickle a made class's instance as (its pair, its state): the made class is not importable by name."""
    return _new_mixed, type(self).__bases__, self.__getstate__()


def _cache_layer(cache, layer_idx: int):
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    return cache.layers[layer_idx]


# ----------------------------------------------------------------------------------------------------------------
# The routed decoder layer


@dataclass(frozen=True)
class LayerRouting:
    """Static routing settings of one decoder layer (set by ``attach_routers``; not per-call state).

    fixed_keep: ``False`` for a statically dropped layer (no router, always skipped); ``None`` for a router.
    """

    layer_idx: int
    target: str
    level: str
    threshold: float
    arch: ArchSpec
    fixed_keep: bool | None = None


def _part(layer: nn.Module, name: str | None):
    return getattr(layer, name) if name is not None else None


def _apply(module, x):
    return x if module is None else module(x)


def _gated(delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``delta`` ``[n, ...]`` times ``gate`` ``[n]`` or ``[n, T]``, broadcast over the remaining dimensions."""
    return delta * gate.reshape(*gate.shape, *[1] * (delta.dim() - gate.dim()))


def _straight_through(delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Real-path output of kept inputs: times the gate (value 1) when it carries a router gradient (real-skip
    training), else unchanged."""
    return _gated(delta, gate) if gate.requires_grad else delta


def _rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """Select batch rows of a tensor that may be broadcast over the batch (leading dim 1) or absent."""
    if t is None or t.shape[0] == 1:
        return t
    return t.index_select(0, rows)


class RoutedLayerMixin:
    """Mixed into a decoder layer's own class by ``attach_routers``; adds ``router`` and re-composes ``forward``.

    The base layer's parameters and state-dict keys are unchanged; the router adds ``router.weight`` (and
    ``router.bias`` with ``RouterConfig.router_bias``) only.
    """

    routing: LayerRouting
    router: nn.Linear | None

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, T, d]
        attention_mask: torch.Tensor | None = None,  # 4-D mask for this layer's attention type, or None
        position_ids: torch.LongTensor | None = None,
        cache=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        routing_context: RoutingContext | None = None,
        **kwargs,
    ) -> torch.Tensor:
        r = self.routing
        ctx = routing_context or RoutingContext(mode="real", attention_mask=None, trace=RoutingTrace())
        h = hidden_states
        x = self.get_submodule(r.arch.pre_attn_norm)(h)  # [B, T, d]
        tokens = ctx.token_mask(h)  # [B, T]
        keep, masked = self._decide(x, tokens, cache, ctx)

        attn_kwargs = dict(
            position_ids=position_ids, cache=cache, position_embeddings=position_embeddings, **kwargs
        )
        gate_attn = keep if r.target in ("attn", "block") else None
        gate_mlp = keep if r.target in ("mlp", "block") else None
        h = self._attention_step(h, x, gate_attn, masked, attention_mask, attn_kwargs)
        return self._mlp_step(h, gate_mlp, masked)

    # -- decision -------------------------------------------------------------------------------------------------

    def _decide(self, x, tokens, cache, ctx) -> tuple[torch.Tensor, bool]:
        """Returns ``keep`` (``[B]`` or ``[B, T]`` float, STE-carrying in training) and whether to run masked."""
        r = self.routing
        B = x.shape[0]
        train_ste = self.router is not None and self.router.weight.requires_grad and torch.is_grad_enabled()
        masked = ctx.runs_masked(train_ste)
        stored = None
        if r.level == "sequence" and cache is not None:
            stored = getattr(_cache_layer(cache, r.layer_idx), "keep_rows", None)

        score = None
        if stored is not None:
            hard = stored
        elif r.fixed_keep is not None:
            shape = (B,) if r.level == "sequence" else tuple(tokens.shape)
            hard = torch.full(shape, r.fixed_keep, dtype=torch.bool, device=x.device)
        else:
            logits = self.router(x).squeeze(-1).float()  # [B, T]
            if r.level == "sequence":  # router(mean of real tokens) == mean of per-token router logits
                w = tokens.float()
                logits = (logits * w).sum(1) / w.sum(1).clamp_min(1.0)  # [B]
            score = torch.sigmoid(logits)
            hard = score >= r.threshold
        if r.level == "token":
            hard = hard & tokens  # padding tokens are never executed

        if r.level == "sequence" and cache is not None and stored is None:
            empty = cache.layers[r.layer_idx]  # nothing stored yet: this is the prefill
            routed = object.__new__(mixed_class(RoutedCacheMixin, type(empty)))
            routed.__dict__.update(empty.__dict__, keep_rows=hard, compact=not masked and r.target in ("attn", "block"))
            cache.layers[r.layer_idx] = routed

        keep = hard.to(x.dtype)
        if train_ste and score is not None:
            keep = keep + (score - score.detach()).to(x.dtype)
        weight = torch.ones(B, device=x.device) if r.level == "sequence" else tokens.float()
        ctx.trace.decisions.append(LayerDecision(r.layer_idx, keep, weight, score))
        return keep, masked

    # -- sub-layers -----------------------------------------------------------------------------------------------

    def _attn_delta(self, x, attention_mask, attn_kwargs) -> torch.Tensor:
        """Attention sub-layer output (before the residual add) for normalised input ``x`` [b, T, d]."""
        out, _ = self.get_submodule(self.routing.arch.attention)(
            hidden_states=x, attention_mask=attention_mask, **attn_kwargs
        )
        return _apply(_part(self, self.routing.arch.post_attn_norm), out)

    def _mlp_delta(self, h) -> torch.Tensor:
        """MLP sub-layer output (before the residual add) for residual-stream input ``h`` [..., d]."""
        a = self.routing.arch
        y = self.get_submodule(a.mlp)(self.get_submodule(a.pre_mlp_norm)(h))
        return _apply(_part(self, a.post_mlp_norm), y)

    def _attention_step(self, h, x, gate, masked, attention_mask, attn_kwargs) -> torch.Tensor:
        if gate is None:
            return h + self._attn_delta(x, attention_mask, attn_kwargs)
        if masked:
            return h + _gated(self._attn_delta(x, attention_mask, attn_kwargs), gate)
        if self.routing.level == "token":
            keep = gate.bool()
            if bool(keep.all()):  # every token kept: the plain path, no gather
                return h + _straight_through(self._attn_delta(x, attention_mask, attn_kwargs), gate)
            return h + _straight_through(self._attn_delta_for_tokens(x, keep, attention_mask, attn_kwargs), gate)
        rows = gate.bool().nonzero().squeeze(1)  # [K]
        if rows.numel() == h.shape[0]:
            return h + _straight_through(self._attn_delta(x, attention_mask, attn_kwargs), gate)
        if rows.numel() == 0:
            self._advance_empty_cache(x, attn_kwargs["cache"])
            return h
        sub = dict(attn_kwargs)
        sub["position_embeddings"] = tuple(_rows(t, rows) for t in attn_kwargs["position_embeddings"])
        sub["position_ids"] = _rows(attn_kwargs["position_ids"], rows)
        delta = self._attn_delta(x.index_select(0, rows), _rows(attention_mask, rows), sub)
        return h.index_add(0, rows, _straight_through(delta, gate.index_select(0, rows)))

    def _mlp_step(self, h, gate, masked) -> torch.Tensor:
        if gate is None:
            return h + self._mlp_delta(h)
        if masked:
            return h + _gated(self._mlp_delta(h), gate)
        B, T, d = h.shape
        flat_gate = gate if self.routing.level == "sequence" else gate.reshape(B * T)  # per row [B] / token [B*T]
        flat = h if self.routing.level == "sequence" else h.reshape(B * T, d)
        idx = flat_gate.bool().nonzero().squeeze(1)  # kept rows / tokens [K]
        if idx.numel() == 0:
            return h
        if idx.numel() == flat.shape[0]:  # every row / token kept: no gather
            return h + _straight_through(self._mlp_delta(h), gate)
        delta = _straight_through(self._mlp_delta(flat.index_select(0, idx)), flat_gate.index_select(0, idx))
        return flat.index_add(0, idx, delta).view(B, T, d)

    def _advance_empty_cache(self, x, cache) -> None:
        """Record ``T`` more positions in a compact cache layer that no row executes (stores nothing)."""
        if cache is None:
            return
        attn = self.get_submodule(self.routing.arch.attention)
        kv_heads = attn.config.num_key_value_heads
        empty = x.new_zeros(0, kv_heads, x.shape[1], attn.head_dim)
        cache.update(empty, empty, self.routing.layer_idx)

    def _attn_delta_for_tokens(self, x, keep, attention_mask, attn_kwargs) -> torch.Tensor:
        """Token-level attention: queries, scores and output projection for kept tokens only; K/V for all tokens.

        x: [B, T, d] normalised input; keep: [B, T] bool. Returns [B, T, d], zero at skipped tokens.
        """
        attn = self.get_submodule(self.routing.arch.attention)
        B, T, d = x.shape
        hd = attn.head_dim
        modeling = sys.modules[type(attn).__module__]  # the family's own rotary and eager attention functions
        rope = modeling.apply_rotary_pos_emb

        k = attn.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # [B, kv_heads, T, hd]
        v = attn.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        cos, sin = (t.expand(B, -1, -1) for t in attn_kwargs["position_embeddings"])  # [B, T, hd]
        k = rope(k, k, cos, sin)[0]
        cache = attn_kwargs["cache"]
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)  # [B, kv_heads, S, hd]
        counts = keep.sum(1)  # [B]
        Tq = int(counts.max())
        if Tq == 0:  # e.g. a skipped decode step: its K/V are written, nothing else runs
            return torch.zeros_like(x)
        # kept positions first, in order: q_pos [B, Tq]; slots past a row's count are padding (discarded)
        q_pos = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :Tq]
        q_valid = torch.arange(Tq, device=x.device)[None, :] < counts[:, None]  # [B, Tq]

        gather = q_pos[..., None].expand(-1, -1, d)
        q = attn.q_proj(x.gather(1, gather)).view(B, Tq, -1, hd).transpose(1, 2)  # [B, heads, Tq, hd]
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        pos_gather = q_pos[..., None].expand(-1, -1, cos.shape[-1])
        q = rope(q, q, cos.gather(1, pos_gather), sin.gather(1, pos_gather))[0]

        S = k.shape[2]
        if attention_mask is None:  # causal without padding: key s is visible to query t iff s <= t + (S - T)
            allowed = torch.arange(S, device=x.device)[None, None, :] <= (q_pos + (S - T))[..., None]
            mask = allowed[:, None]  # [B, 1, Tq, S]
            if attn.config._attn_implementation == "eager":
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=x.device).masked_fill(
                    ~mask, torch.finfo(q.dtype).min
                )
        else:
            full = attention_mask.expand(B, -1, -1, -1)  # [B, 1, T, S]
            mask = full.gather(2, q_pos[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[-1]))

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, modeling.eager_attention_forward)
        extra = {k_: v_ for k_, v_ in attn_kwargs.items() if k_ not in ("position_embeddings", "cache", "position_ids")}
        out, _ = interface(
            attn,
            q,
            k,
            v,
            mask,
            dropout=0.0,
            scaling=attn.scaling,
            sliding_window=getattr(attn, "sliding_window", None),
            **extra,
        )  # [B, Tq, heads, hd]
        out = attn.o_proj(out.reshape(B, Tq, -1))
        out = _apply(_part(self, self.routing.arch.post_attn_norm), out)  # [B, Tq, d]
        delta = torch.zeros_like(x)
        b_idx = torch.arange(B, device=x.device)[:, None].expand(-1, Tq)
        delta[b_idx[q_valid], q_pos[q_valid]] = out[q_valid]
        return delta


# ----------------------------------------------------------------------------------------------------------------
# Attaching, modes, checkpoints


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


def _router_record(model: nn.Module) -> dict:
    """The routers' settings besides their weights: checkpoint format, ``RouterConfig``, static drop, thresholds."""
    setup = _setup(model)
    thresholds = {str(i): layer.routing.threshold for i, layer in routed_layers(model).items()}
    return {"format": CHECKPOINT_FORMAT, "config": asdict(setup.config), "static_drop": setup.static,
            "thresholds": thresholds}


def _record_in_config(model: nn.Module) -> None:
    """Keep ``model.config.routertune`` equal to the router record, so ``save_pretrained`` writes it to config.json
    (the router weights are in the state dict) and ``models.load_model`` re-attaches the routers."""
    model.config.routertune = _router_record(model)


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
    _TARGET_REGISTRY[config.target].attach(model, config, static_drop=static_drop)
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
    t = _real(value, name)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return t


def _layer_key(key) -> int:
    """A per-layer threshold key: an int, or its digit string (what a JSON round trip makes of int keys)."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return _index(key, "a threshold's layer key")


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


def save_routers(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the routers to one safetensors file (weights, ``RouterConfig``, thresholds, base-model identity).

    The file is written atomically (temporary file, then rename); ``path`` must not be a directory.
    """
    if Path(path).is_dir():
        raise ValueError(f"save_routers writes one file, but {path} is a directory; pass a file path such as "
                         f"{Path(path) / 'routers.safetensors'}")
    tensors = router_state(model)
    record = {**_router_record(model), "base_model": model_identity(model)}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}
    return write_atomic(path, safetensors_bytes(tensors if tensors else {"empty": torch.zeros(0)}, metadata=metadata))


def load_routers(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the routers saved by ``save_routers`` to ``model`` (a stock model, or one with the same routers)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # not a safetensors file at all
        raise ValueError(f"{path} is not a router checkpoint (expected a safetensors file from save_routers): {e}")
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a router checkpoint (format {metadata.get('format')!r}, expected "
                         f"{CHECKPOINT_FORMAT!r}); create one with routertune_lib.save_routers")
    saved = json.loads(metadata["base_model"])
    here = model_identity(model)
    mismatch = {k: (saved[k], here[k]) for k in ("model_type", "hidden_size", "num_hidden_layers") if saved[k] != here[k]}
    if mismatch:
        raise ValueError(
            f"Router checkpoint {path} was trained for another model: "
            + ", ".join(f"{k} saved={a} here={b}" for k, (a, b) in mismatch.items())
        )
    config = RouterConfig.from_dict(json.loads(metadata["config"]))
    static = json.loads(metadata["static_drop"])
    setup = getattr(model, "routertune", None)
    if setup is None:
        attach_routers(model, config, static_drop=static)
    elif asdict(setup.config) != asdict(config) or setup.static != static:
        raise ValueError(f"The model's routers ({setup.config}) differ from the checkpoint's ({config}); "
                         "detach_routers(model) first")
    load_router_state(model, load_file(str(path)))
    set_thresholds(model, {int(i): t for i, t in json.loads(metadata["thresholds"]).items()})
    return model


def restore_routers(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Re-attach the routers of a routed model saved with ``save_pretrained`` to ``directory``: settings from
    ``model.config.routertune`` (config.json), weights from the directory's ``*.safetensors`` files. Returns
    ``model``; a model whose config has no ``routertune`` entry is returned unchanged. ``models.load_model`` calls it.
    """
    from safetensors import safe_open

    record = getattr(model.config, "routertune", None)
    if record is None:
        return model
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}/config.json has a 'routertune' entry that is not a {CHECKPOINT_FORMAT!r} "
                         f"router record: {record!r:.200}")
    del model.config.routertune  # attach_routers writes it again
    attach_routers(model, RouterConfig.from_dict(record["config"]), static_drop=record["static_drop"])
    names = {module: name for name, module in model.named_modules()}
    wanted = {f"{names[layer.router]}.{name}": p for layer in routed_layers(model).values()
              if layer.router is not None for name, p in layer.router.named_parameters()}
    found = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in wanted.keys() & set(f.keys())})
    missing = sorted(wanted.keys() - found.keys())
    if missing:
        detach_routers(model)
        raise ValueError(f"{directory}/config.json describes routers, but its safetensors files lack {missing}; "
                         "save the routed model again with save_pretrained")
    with torch.no_grad():
        for k, param in wanted.items():
            param.copy_(found[k])
    set_thresholds(model, record["thresholds"])
    return model


register_config_restorer("routertune", restore_routers)
