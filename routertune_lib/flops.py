"""Executed-FLOP fraction of routed forwards: the deterministic x-axis beside measured speed-ups.

Per decoder layer with hidden size ``d``, query width ``d_q`` (heads x head_dim; ``d`` for Llama-style models), KV
width ``d_kv`` (KV heads x head_dim) and MLP width ``d_ff``, a token that sees ``S`` keys costs (FLOPs = 2 x MACs)

    attention projections   2*d*d_q (q) + 2*d*2*d_kv (k, v) + 2*d_q*d (o)
    scores and values       2*2*S*d_q        S = position + 1 (causal), at most the window on sliding layers
    gated MLP               2*3*d*d_ff       MoE: the gate 2*d*E plus 2*3*d*d_ff_expert per (token, expert) assignment
    LM head                 2*d*vocab        per scored position (generation scores one position per row and step)

DeepSeek-V2 (multi-head latent attention, ``H`` heads, as transformers computes it: K/V decompressed per token):
q ``2*d*H*d_qk`` (or through ``q_lora_rank``), K/V ``2*d*(kv_lora_rank + d_rope) + 2*kv_lora_rank*H*(d_nope + d_v)``,
o ``2*H*d_v*d``, scores and values ``2*S*H*(d_qk + d_v)``; its first ``first_k_dense_replace`` layers run a dense MLP
(``intermediate_size``), the others the MoE plus its shared experts (``n_shared_experts`` x ``moe_intermediate_size``,
run by every token, whatever the expert routers decide).

Embedding lookups, norms, rotary embeddings and the routers themselves (2*d per token and routed layer) are not
counted. Attention counts the scores a causal (sliding-window) attention needs, not those a kernel computes and
masks. What routing skips follows ``routing``'s ``real`` mode:

- sequence level: a skipped row runs none of the gated sub-layer (no K/V either);
- token level: a skipped token runs no query, scores or output projection, but its K/V are still written;
- ``masked`` mode computes everything (fraction 1.0 whatever the decisions);
- MoE expert routers / Expert Drop: a dropped (token, expert) assignment runs no expert MLP; the gate always runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .moe import EXPERTS
from .routing import RoutingTrace

# MoE families whose every decoder layer is an MoE block without shared experts: config field names of
# (number of experts, experts per token, one expert's FFN width).
_MOE_FIELDS = {"olmoe": ("num_experts", "num_experts_per_tok", "intermediate_size"),
               "mixtral": ("num_local_experts", "num_experts_per_tok", "intermediate_size")}
_DENSE = ("llama", "mistral", "qwen2", "gemma3_text")
_MLA = ("deepseek_v2",)  # latent attention, dense first layers, shared experts


@dataclass(frozen=True)
class FlopSpec:
    """Per-token FLOP constants of one architecture, from its ``config``.

    windows: per layer, the sliding window (keys a token can see) or ``None`` (full causal attention).
    experts: ``(E, k)`` for MoE models (``mlp`` is then one expert's MLP per assignment), else ``None``.
    qo, kv: the q + o and the K/V projection FLOPs of one token where they are not ``2*2*d*d_q`` and ``2*2*d*d_kv``
        (latent attention); qk_width: the width of the query-key products where it is not ``q_width`` (the values').
    dense_layers, dense_mlp: the first ``dense_layers`` layers of an MoE model run a dense MLP of ``dense_mlp`` FLOPs
        per token; shared_mlp: the shared experts' FLOPs per token of the MoE layers (never skipped).
    """

    num_layers: int
    hidden: int
    q_width: int
    kv_width: int
    mlp: int
    vocab: int
    windows: tuple[int | None, ...]
    experts: tuple[int, int] | None = None
    qo: int | None = None
    kv: int | None = None
    qk_width: int | None = None
    dense_layers: int = 0
    dense_mlp: int = 0
    shared_mlp: int = 0

    @classmethod
    def from_config(cls, config) -> "FlopSpec":
        model_type = getattr(config, "model_type", None)
        if model_type not in _DENSE + tuple(_MOE_FIELDS) + _MLA:
            raise NotImplementedError(
                f"FLOP counting is not implemented for model_type {model_type!r}; supported: "
                f"{sorted(_DENSE + tuple(_MOE_FIELDS) + _MLA)} (MoE with shared experts or dense layers other than "
                "DeepSeek-V2's, e.g. qwen2_moe, is not)")
        if model_type in _MLA:
            return cls._latent(config)
        d, n = config.hidden_size, config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types is not None:
            windows = tuple(window if t == "sliding_attention" else None for t in types[:n])
        else:  # Mistral / Mixtral: the window, when set, applies to every layer
            windows = (window,) * n
        experts, mlp = None, 2 * 3 * d * config.intermediate_size
        if model_type in _MOE_FIELDS:
            e_field, k_field, ff_field = _MOE_FIELDS[model_type]
            experts = (getattr(config, e_field), getattr(config, k_field))
            mlp = 2 * 3 * d * getattr(config, ff_field)
        return cls(num_layers=n, hidden=d, q_width=config.num_attention_heads * head_dim,
                   kv_width=config.num_key_value_heads * head_dim, mlp=mlp, vocab=config.vocab_size,
                   windows=windows, experts=experts)

    @classmethod
    def _latent(cls, config) -> "FlopSpec":
        """DeepSeek-V2 (module docstring)."""
        d, n, H = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
        qk, v, rank = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
        q_rank = config.q_lora_rank
        q = 2 * d * H * qk if not q_rank else 2 * d * q_rank + 2 * q_rank * H * qk
        expert = 2 * 3 * d * config.moe_intermediate_size
        return cls(num_layers=n, hidden=d, q_width=H * v, kv_width=H * (config.qk_nope_head_dim + v), mlp=expert,
                   vocab=config.vocab_size, windows=(None,) * n,
                   experts=(config.n_routed_experts, config.num_experts_per_tok), qo=q + 2 * H * v * d,
                   kv=2 * d * (rank + config.qk_rope_head_dim) + 2 * rank * H * (config.qk_nope_head_dim + v),
                   qk_width=H * qk, dense_layers=config.first_k_dense_replace,
                   dense_mlp=2 * 3 * d * config.intermediate_size, shared_mlp=(config.n_shared_experts or 0) * expert)

    @property
    def attn_qo(self) -> int:
        """q and o projections of one token."""
        return 2 * 2 * self.hidden * self.q_width if self.qo is None else self.qo

    @property
    def attn_kv(self) -> int:
        """k and v projections of one token."""
        return 2 * 2 * self.hidden * self.kv_width if self.kv is None else self.kv

    @property
    def head(self) -> int:
        """LM head of one scored position."""
        return 2 * self.hidden * self.vocab

    def contexts(self, layer: int, past: int, new: int) -> torch.Tensor:
        """``[new]`` float64: keys seen by each of ``new`` tokens that follow ``past`` cached positions."""
        s = torch.arange(past + 1, past + new + 1, dtype=torch.float64)
        window = self.windows[layer]
        return s if window is None else s.clamp(max=window)

    def scores(self, contexts: torch.Tensor) -> torch.Tensor:
        """Scores and weighted values of tokens seeing ``contexts`` keys."""
        return 2 * ((self.qk_width or self.q_width) + self.q_width) * contexts


def _keep_matrix(keep: torch.Tensor, batch: int, new: int) -> tuple[torch.Tensor, bool]:
    """``([B, T] float64 keep, token_level)`` from a decision's ``[B]`` (sequence) or ``[B, T]`` (token) keep."""
    k = keep.detach().to("cpu", torch.float64)
    if k.dim() == 1:
        return k[:, None].expand(batch, new), False
    return k.reshape(batch, new), True


def forward_flops(spec: FlopSpec, target: str | None, keeps: dict[int, torch.Tensor], batch: int, new: int,
                  past: int = 0, scored: int | None = None) -> tuple[float, float]:
    """``(executed, dense)`` FLOPs of one forward of ``batch`` rows x ``new`` tokens after ``past`` cached positions.

    target: what the routers gate (``attn``, ``mlp``, ``block``, ``experts``; ``None`` for a model without routers).
    keeps: ``{layer: keep}`` hard decisions of the routed layers (``LayerDecision.keep``: ``[B]`` or ``[B, T]``;
        ``[B*T, k]`` for experts); layers not in it run densely. scored: LM-head positions per row (default ``new``).
    """
    if target == EXPERTS and spec.experts is None:
        raise ValueError("forward_flops: target 'experts' needs an MoE model (FlopSpec.experts is None)")
    scored = new if scored is None else scored
    dense = executed = float(batch * scored * spec.head)
    for layer in range(spec.num_layers):
        ctx = spec.contexts(layer, past, new)  # [T]
        per_token = spec.attn_qo + spec.scores(ctx)  # [T] what a skipped query saves
        attn = batch * float(per_token.sum()) + batch * new * spec.attn_kv
        if layer < spec.dense_layers:
            mlp = float(batch * new * spec.dense_mlp)
        elif spec.experts is None:
            mlp = float(batch * new * spec.mlp)
        else:
            num_experts, top_k = spec.experts
            gate = float(batch * new * (2 * spec.hidden * num_experts + spec.shared_mlp))  # with the shared experts
            mlp = gate + batch * new * top_k * spec.mlp
        dense += attn + mlp
        keep = keeps.get(layer)
        if keep is None:
            executed += attn + mlp
        elif target == EXPERTS:
            executed += attn + gate + float(keep.detach().double().sum()) * spec.mlp
        else:
            k, token_level = _keep_matrix(keep, batch, new)
            if target in ("attn", "block"):
                kv = batch * new if token_level else float(k.sum())  # token level writes every token's K/V
                attn = float((k * per_token).sum()) + kv * spec.attn_kv
            if target in ("mlp", "block"):
                mlp = float(k.sum()) * spec.mlp
            executed += attn + mlp
    return executed, dense


class FlopCounter:
    """Executed and dense FLOPs summed over forwards of one model (see :func:`record_flops`)."""

    def __init__(self, config, target: str | None = None):
        self.spec = FlopSpec.from_config(config)
        self.target = target
        self.executed = 0.0
        self.dense = 0.0

    def add(self, trace: RoutingTrace | None, batch: int, new: int, past: int = 0, scored: int | None = None,
            mode: str = "real") -> None:
        """Count one forward; ``trace`` ``None`` or ``mode="masked"``: everything executed."""
        keeps = {} if trace is None or mode == "masked" else {d.layer: d.keep for d in trace.decisions}
        e, d = forward_flops(self.spec, self.target, keeps, batch, new, past, scored)
        self.executed += e
        self.dense += d

    def fraction(self) -> float:
        """Executed / dense FLOPs over the counted forwards (1.0 when nothing was counted)."""
        return self.executed / self.dense if self.dense else 1.0


@contextlib.contextmanager
def record_flops(model: nn.Module):
    """Count the FLOPs of every forward of ``model`` (a ``*ForCausalLM``, routed or not) inside the block, e.g.
    ``with record_flops(m) as c: m.generate(...)`` then ``c.fraction()``.

    Each forward reads its rows and tokens from ``input_ids`` / ``inputs_embeds``, its cached positions from the cache
    it is given (else the 2-D ``attention_mask``, past + current), its scored positions from ``logits``, and its decisions from
    ``output.routing`` in the model's routing mode at that moment.
    """
    setup = getattr(model, "routertune", None)
    counter = FlopCounter(model.config, setup.config.target if setup is not None else None)
    shape: dict[str, int] = {}

    def before(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs["inputs_embeds"]
        B, T = x.shape[:2]
        mask, cache = kwargs.get("attention_mask"), kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:  # not yet updated by this forward
            past = cache.get_seq_length()
        else:
            past = mask.shape[-1] - T if mask is not None and mask.dim() == 2 else 0
        shape.update(batch=B, new=T, past=past)

    def after(module, args, kwargs, output):
        logits = getattr(output, "logits", None)
        scored = logits.shape[1] if logits is not None else shape["new"]
        mode = setup.mode if setup is not None else "real"
        counter.add(getattr(output, "routing", None) if setup is not None else None, shape["batch"], shape["new"],
                    shape["past"], scored, mode)

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


def flop_fraction_from_counts(config, target: str, level: str, counts: dict[int, tuple[float, float]], seq_len: int,
                              scored: int | None = None) -> float:
    """Executed FLOP fraction of a causal forward of ``seq_len`` tokens when each routed layer executes the share
    ``executed / total`` of ``counts`` (``RoutingTrace.counts()`` / an evaluation's ``routing``), spread evenly
    over positions (exact per layer for sequence level; token level assumes skipping independent of position).

    scored: LM-head positions (default ``seq_len``: a plain forward scores every position).
    """
    if target not in ("attn", "mlp", "block", EXPERTS) or level not in ("sequence", "token"):
        raise ValueError(f"flop_fraction_from_counts: target {target!r} / level {level!r} unknown; targets attn, mlp, "
                         f"block, {EXPERTS}; levels sequence, token")
    spec = FlopSpec.from_config(config)
    share = {int(i): e / n if n else 1.0 for i, (e, n) in counts.items()}
    if target == EXPERTS:
        shape = (seq_len, spec.experts[1])
    else:
        shape = (1,) if level == "sequence" else (1, seq_len)
    keeps = {i: torch.full(shape, f, dtype=torch.float64) for i, f in share.items()}
    executed, dense = forward_flops(spec, target, keeps, 1, seq_len, 0, scored)
    return executed / dense
