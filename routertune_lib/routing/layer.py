"""The routed decoder layer (``RoutedLayerMixin``) and the KV-cache layers it keeps decisions in: how
``h = h + keep * F(h)`` is executed.

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
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..architectures import ArchSpec
from .trace import LayerDecision, RoutingContext, RoutingTrace


# ----------------------------------------------------------------------------------------------------------------
# KV cache: routed layers keep the prefill decision and, when attention is skipped per sequence, only kept rows


class RoutedCacheMixin:
    """Mixed into the cache layer of a sequence-routed layer at prefill (its own class is kept: full or sliding).

    keep_rows: ``[B]`` bool prefill decision, reused by every decode step.
    keep_index: ``[K]`` indices of the kept rows (``keep_rows.nonzero()``, found once at a real prefill: a decode
        step needs no nonzero, and so no host-device synchronisation, to know which rows run); None after a masked
        prefill, which runs every row.
    keep: ``[B]`` the decision in the layer's dtype (1.0 kept), the gate every decode step applies and traces.
    weight: ``[B]`` ones, each sequence's weight in the trace.
    compact: True when K/V are stored for kept rows only (``keys: [K, kv_heads, S, head_dim]``, K = kept rows; a
        layer skipped by every row holds ``[0, kv_heads, S, head_dim]``: no memory, but it still knows ``S``).

    ``keep`` and ``weight`` are made once here, so that a decode step launches no operator to decide.
    """

    keep_rows: torch.Tensor
    keep_index: torch.Tensor | None
    keep: torch.Tensor
    weight: torch.Tensor
    compact: bool

    def set_decision(self, keep_rows: torch.Tensor, keep_index: torch.Tensor | None, keep: torch.Tensor) -> None:
        """Store a decision: ``keep_rows`` ``[B]`` bool, its kept rows' indices (or None) and ``keep`` ``[B]``, the
        same decision as floats without gradient."""
        self.keep_rows, self.keep_index, self.keep = keep_rows, keep_index, keep.detach()
        self.weight = torch.ones(keep_rows.shape, device=keep_rows.device)

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


def trains_router(router: nn.Module | None) -> bool:
    """Whether a forward now trains ``router`` (trainable weights under autograd): its decisions then carry the
    straight-through gradient."""
    return router is not None and router.weight.requires_grad and torch.is_grad_enabled()


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
        stored = _cache_layer(cache, r.layer_idx) if r.level == "sequence" and cache is not None else None
        if isinstance(stored, RoutedCacheMixin):  # cached sequences continue: the prefill's decision, as stored
            keep, masked, rows = self._reuse(stored, ctx)
            # no row runs attention: its input norm is not computed either (what a removed layer costs)
            skips_attn = not masked and r.target != "mlp" and rows.numel() == 0
            x = None if skips_attn else self.get_submodule(r.arch.pre_attn_norm)(h)  # [B, T, d]
        else:
            x = self.get_submodule(r.arch.pre_attn_norm)(h)  # [B, T, d]
            keep, masked, rows = self._decide(x, cache, stored, ctx)

        attn_kwargs = dict(
            position_ids=position_ids, cache=cache, position_embeddings=position_embeddings, **kwargs
        )
        gate_attn = keep if r.target in ("attn", "block") else None
        gate_mlp = keep if r.target in ("mlp", "block") else None
        h = self._attention_step(h, x, gate_attn, masked, attention_mask, attn_kwargs, rows)
        return self._mlp_step(h, gate_mlp, masked, rows)

    # -- decision -------------------------------------------------------------------------------------------------

    def _reuse(self, stored: RoutedCacheMixin, ctx) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        """``_decide``'s result for cached sequences, from the decision ``stored`` at their prefill."""
        masked = ctx.runs_masked(trains_router(self.router))
        rows = stored.keep_index
        if rows is None and not masked:  # a masked prefill found no index; the real path needs it
            rows = stored.keep_rows.nonzero().squeeze(1)  # [K]
        ctx.trace.decisions.append(LayerDecision(self.routing.layer_idx, stored.keep, stored.weight, None))
        return stored.keep, masked, rows

    def _decide(self, x, cache, empty, ctx) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        """Decides for the ``T`` tokens of ``x`` [B, T, d] (a prefill, or a forward without cache).

        Returns ``keep`` (``[B]`` or ``[B, T]`` float, STE-carrying in training), whether to run masked and, at
        sequence level in real mode, the kept rows' indices ``[K]`` (token level and masked: None). ``empty``: at a
        sequence-level prefill, this layer's cache layer (not yet holding a decision), which a routed cache layer
        storing the decision replaces for the forwards that continue it; None otherwise.
        """
        r = self.routing
        B = x.shape[0]
        train_ste = trains_router(self.router)
        masked = ctx.runs_masked(train_ste)
        tokens = ctx.token_mask(x)  # [B, T]
        score = rows = None
        if r.fixed_keep is not None:
            shape = (B,) if r.level == "sequence" else tuple(tokens.shape)
            hard = torch.full(shape, r.fixed_keep, dtype=torch.bool, device=x.device)
        else:
            logits = self.router(x).squeeze(-1).float()  # [B, T]
            if r.level == "sequence":  # router(mean of real tokens) == mean of per-token router logits
                w = ctx.token_weight(x)
                logits = (logits * w).sum(1) / w.sum(1).clamp_min(1.0)  # [B]
            score = torch.sigmoid(logits)
            if ctx.calibrate is not None:  # calibration: this layer's threshold from its scores of the real inputs
                real = score if r.level == "sequence" else score[tokens]
                r = self.routing = replace(r, threshold=ctx.calibrate(r.layer_idx, real))
            hard = score >= r.threshold
        if r.level == "token":
            hard = hard & tokens  # padding tokens are never executed
        elif not masked:  # the real path's kept rows (masked runs every row: no index needed)
            rows = hard.nonzero().squeeze(1)  # [K]

        keep = hard.to(x.dtype)
        weight = torch.ones(B, device=x.device) if r.level == "sequence" else ctx.token_weight(x)
        if empty is not None:  # the prefill: store the decision for the decode steps
            routed = object.__new__(mixed_class(RoutedCacheMixin, type(empty)))
            routed.__dict__.update(empty.__dict__, compact=not masked and r.target in ("attn", "block"))
            routed.set_decision(hard, rows, keep)
            cache.layers[r.layer_idx] = routed
            weight = routed.weight
        if train_ste and score is not None:
            keep = keep + (score - score.detach()).to(x.dtype)
        ctx.trace.decisions.append(LayerDecision(r.layer_idx, keep, weight, score))
        return keep, masked, rows

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

    def _attention_step(self, h, x, gate, masked, attention_mask, attn_kwargs, rows) -> torch.Tensor:
        if gate is None:
            return h + self._attn_delta(x, attention_mask, attn_kwargs)
        if masked:
            return h + _gated(self._attn_delta(x, attention_mask, attn_kwargs), gate)
        if self.routing.level == "token":
            keep = gate.bool()
            kept = int(keep.sum())  # one host read of the decision, for all three tests below
            if kept == keep.numel():  # every token kept: the plain path, no gather
                return h + _straight_through(self._attn_delta(x, attention_mask, attn_kwargs), gate)
            if h.shape[1] == 1:
                if kept:
                    # a decode step where some rows keep their token: the kept-token path would pad to one query
                    # per row anyway, so the plain attention (K/V written for every row, as there) with skipped
                    # rows' output zeroed does the same work without its gathers and mask building
                    delta = self._attn_delta(x, attention_mask, attn_kwargs).masked_fill(~keep[..., None], 0.0)
                    return h + _straight_through(delta, gate)
                self._keys_values(x, attn_kwargs)  # a decode step every row skips: K/V written, nothing else runs
                return h
            return h + _straight_through(self._attn_delta_for_tokens(x, keep, attention_mask, attn_kwargs), gate)
        if rows.numel() == 0:  # rows: [K] kept sequences (none: x may be None, not computed)
            self._advance_empty_cache(h, attn_kwargs["cache"])
            return h
        if rows.numel() == h.shape[0]:
            return h + _straight_through(self._attn_delta(x, attention_mask, attn_kwargs), gate)
        sub = dict(attn_kwargs)
        sub["position_embeddings"] = tuple(_rows(t, rows) for t in attn_kwargs["position_embeddings"])
        sub["position_ids"] = _rows(attn_kwargs["position_ids"], rows)
        delta = self._attn_delta(x.index_select(0, rows), _rows(attention_mask, rows), sub)
        return h.index_add(0, rows, _straight_through(delta, gate.index_select(0, rows)))

    def _mlp_step(self, h, gate, masked, rows) -> torch.Tensor:
        if gate is None:
            return h + self._mlp_delta(h)
        if masked:
            return h + _gated(self._mlp_delta(h), gate)
        B, T, d = h.shape
        flat_gate = gate if self.routing.level == "sequence" else gate.reshape(B * T)  # per row [B] / token [B*T]
        flat = h if self.routing.level == "sequence" else h.reshape(B * T, d)
        idx = rows if self.routing.level == "sequence" else flat_gate.bool().nonzero().squeeze(1)  # kept [K]
        if idx.numel() == 0:
            return h
        if idx.numel() == flat.shape[0]:  # every row / token kept: no gather
            return h + _straight_through(self._mlp_delta(h), gate)
        delta = _straight_through(self._mlp_delta(flat.index_select(0, idx)), flat_gate.index_select(0, idx))
        return flat.index_add(0, idx, delta).view(B, T, d)

    def _advance_empty_cache(self, h, cache) -> None:
        """Record the ``T`` positions of ``h`` [B, T, d] in a compact cache layer that no row executes (stores
        nothing)."""
        if cache is None:
            return
        attn = self.get_submodule(self.routing.arch.attention)
        kv_heads = attn.config.num_key_value_heads
        empty = h.new_zeros(0, kv_heads, h.shape[1], attn.head_dim)
        cache.update(empty, empty, self.routing.layer_idx)

    def _keys_values(self, x, attn_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``x`` [B, T, d] (keys normed and rotated as the family's attention does), appended
        to the cache when there is one; returns the cache's (or, without one, these) ``[B, kv_heads, S, hd]``."""
        attn = self.get_submodule(self.routing.arch.attention)
        B, T, _ = x.shape
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # [B, kv_heads, T, hd]
        v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        cos, sin = attn_kwargs["position_embeddings"]  # [1 or B, T, hd]
        k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(k, k, cos, sin)[0]
        cache = attn_kwargs["cache"]
        return (k, v) if cache is None else cache.update(k, v, attn.layer_idx)

    def _attn_delta_for_tokens(self, x, keep, attention_mask, attn_kwargs) -> torch.Tensor:
        """Token-level attention: queries, scores and output projection for kept tokens only; K/V for all tokens.

        x: [B, T, d] normalised input; keep: [B, T] bool. Returns [B, T, d], zero at skipped tokens.
        """
        attn = self.get_submodule(self.routing.arch.attention)
        B, T, d = x.shape
        hd = attn.head_dim
        modeling = sys.modules[type(attn).__module__]  # the family's own rotary and eager attention functions
        rope = modeling.apply_rotary_pos_emb

        k, v = self._keys_values(x, attn_kwargs)  # [B, kv_heads, S, hd]
        cos, sin = (t.expand(B, -1, -1) for t in attn_kwargs["position_embeddings"])  # [B, T, hd]
        counts = keep.sum(1)  # [B]
        Tq = int(counts.max())
        if Tq == 0:  # every token of this forward skips: its K/V are written, nothing else runs
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
