"""Router-Tuning for Mixture-of-Experts models: one token-level router per expert, real skipping, Expert Drop.

An MoE block's gate assigns every token to ``k`` of its ``E`` experts (``top_k_index``/``top_k_weights``, ``[N, k]``
over the ``N = B*T`` flattened tokens). Expert routing adds, per routed MoE layer, a zero-initialised
``Linear(d, E, bias=RouterConfig.router_bias)``: row ``e`` is expert ``e``'s router. It reads the same hidden states
the experts get:

    score  = sigmoid(router(x))                      # [N, E]   every expert's score of every token
    s      = score.gather(1, top_k_index)            # [N, k]   the scores of the token's assigned experts
    keep   = (s >= threshold) & real_token           # [N, k]   an assignment runs only when its expert keeps it
    out    = experts(x, top_k_index, top_k_weights * keep)

so a token assigned to expert ``e`` by the gate is dropped by ``e`` when ``e``'s router scores it below the threshold
(paper, section 1). Gate weights are not renormalised: a dropped assignment just contributes nothing.

``real`` mode (inference, and training with ``training_forward="real"``, where a kept assignment's gate weight is
multiplied by its straight-through decision) gives each expert only the tokens it keeps: the kept assignments are
gathered into a ``[K, d]`` batch with ``top-1`` routing and passed to the model's own experts module (eager loop,
grouped_mm or batched_mm: whatever ``config._experts_implementation`` selects), then added back per token. ``masked``
mode (and training with the default ``training_forward="masked"``, straight-through ``keep = hard + s - s.detach()``)
runs every assignment and multiplies its gate weight by ``keep``. When no real token's assignment is dropped both modes
call the experts module unchanged (padding rows included; they are never counted), so zero routers reproduce the
original model bit for bit.

The machinery is ``routing``'s: this module registers the ``experts`` target (``routing.register_target``), so
``RouterConfig(target="experts", level="token", layers=...)`` (see :func:`expert_router_config`), ``attach_routers`` /
``detach_routers`` / ``save_routers`` / ``load_routers`` / ``set_thresholds`` / ``routing_mode`` /
``calibrate_thresholds`` / ``train_routers`` all work unchanged; the routed module of a layer (``routed_layers``) is its
experts module, whose class gains :class:`ExpertRoutingMixin` so state-dict keys only gain
``...mlp.experts.router.weight``. Each forward's decisions are :class:`ExpertDecision` s in
the ``RoutingTrace`` (``output.routing``), so the trainer's capacity loss counts kept / assigned (token, expert) pairs.

**Expert Drop** (the paper's static baseline, :func:`attach_expert_drop`) removes whole experts for every token through
the same real-skip path; :func:`expert_statistics` measures the gate's routing-weight mass per expert (importance)
and the assigned / executed token counts per expert (Figure 8's load), and :func:`expert_drop_plan` picks the globally
least important experts up to a target skipping ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import nn

from .architectures import decoder_layers
from .batching import forward_batches
from .models import load_tokenizer
from .routing import (
    LayerDecision,
    RouterConfig,
    RoutingContext,
    RoutingSetup,
    RoutingTrace,
    detach_routers,
    mixed_class,
    register_target,
    routing_mode,
    routing_post_hook,
    routing_pre_hook,
    trains_router,
    zero_router,
)

EXPERTS = "experts"  # RouterConfig.target of expert routers (token level), registered with routing below

# ----------------------------------------------------------------------------------------------------------------
# Where the experts live, per family (data, not branches)


@dataclass(frozen=True)
class MoESpec:
    """Attribute paths inside one decoder layer: ``experts`` is a ``transformers`` 5.x fused experts module
    (``forward(hidden [N, d], top_k_index [N, k], top_k_weights [N, k]) -> [N, d]``, ``num_experts``), ``gate`` the
    block's top-k router. Layers without the experts module (dense layers of DeepSeek / Qwen2-MoE) are not MoE layers.
    """

    family: str
    experts: str = "mlp.experts"
    gate: str = "mlp.gate"


MOE_FAMILIES: dict[str, MoESpec] = {
    name: MoESpec(family=name) for name in ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")
}


def moe_spec(model: nn.Module) -> MoESpec:
    """The :class:`MoESpec` of a causal LM; ``ValueError`` naming the supported ``model_type`` values otherwise."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MOE_FAMILIES:
        raise ValueError(
            f"Expert routers are not supported for model_type {model_type!r} ({type(model).__name__}); supported "
            f"Mixture-of-Experts model types: {sorted(MOE_FAMILIES)}. For dense models use RouterConfig(target="
            "'attn' | 'mlp' | 'block')."
        )
    return MOE_FAMILIES[model_type]


def _experts_module(layer: nn.Module, spec: MoESpec) -> nn.Module | None:
    try:
        module = layer.get_submodule(spec.experts)
    except AttributeError:
        return None
    return module if hasattr(module, "num_experts") else None


def moe_layers(model: nn.Module) -> list[int]:
    """0-based indices of the decoder layers that hold an MoE experts module."""
    spec = moe_spec(model)
    return [i for i, layer in enumerate(decoder_layers(model)) if _experts_module(layer, spec) is not None]


def expert_router_config(model: nn.Module, capacity: float = 0.75, capacity_weight: float = 0.1,
                         threshold: float = 0.5, layers: list[int] | None = None) -> RouterConfig:
    """``RouterConfig`` for expert routers on ``layers`` (default: every MoE layer of ``model``).

    capacity: target fraction of the gate's (token, expert) assignments that are executed (0.75 = the paper's 25%
    overall skipping).
    """
    return RouterConfig(target=EXPERTS, level="token", layers=list(layers if layers is not None else moe_layers(model)),
                        threshold=threshold, capacity=capacity, capacity_weight=capacity_weight)


# ----------------------------------------------------------------------------------------------------------------
# Per-forward decisions


@dataclass
class ExpertDecision(LayerDecision):
    """One MoE layer's decisions in one forward, per (token, assigned expert) pair.

    keep / weight / score: ``[N, k]`` as in :class:`routing.LayerDecision` (``weight`` 1.0 for real tokens' pairs;
    ``score`` ``None`` for Expert Drop). experts: ``[N, k]`` the gate's expert indices. gate_weights: ``[N, k]`` the
    gate's routing weights. num_experts: ``E``.
    """

    experts: torch.Tensor = None
    gate_weights: torch.Tensor = None
    num_experts: int = 0

    def per_expert(self) -> dict[str, torch.Tensor]:
        """``{"assigned", "executed", "weight_mass"}``: ``[E]`` float64 sums over this forward's real tokens."""
        idx = self.experts.reshape(-1)
        w = self.weight.detach().reshape(-1).double()

        def bins(values):
            return torch.zeros(self.num_experts, dtype=torch.float64, device=idx.device).index_add_(0, idx, values)

        return {"assigned": bins(w), "executed": bins(self.keep.detach().reshape(-1).double() * w),
                "weight_mass": bins(self.gate_weights.detach().reshape(-1).double() * w)}


@dataclass(frozen=True)
class ExpertRouting:
    """Static settings of one routed experts module. dropped_experts: experts removed for every token (Expert Drop;
    then there is no router)."""

    layer_idx: int
    num_experts: int
    threshold: float
    dropped_experts: tuple[int, ...] = ()


class ExpertRoutingMixin:
    """Mixed into an experts module's own class; adds ``router`` (``Linear(d, E)``, or ``None`` for Expert Drop) and
    filters the gate's assignments before calling the original ``forward``."""

    routing: ExpertRouting
    router: nn.Linear | None
    _routing_context: RoutingContext | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # hidden_states [N, d]; top_k_index, top_k_weights [N, k]
        r = self.routing
        ctx = self._routing_context or RoutingContext(mode="real", attention_mask=None, trace=RoutingTrace())
        N, k = top_k_index.shape
        tokens = self._token_mask(ctx, hidden_states)  # [N] bool
        train_ste = trains_router(self.router)
        masked = ctx.runs_masked(train_ste)

        score = None
        if self.router is not None:
            score = torch.sigmoid(self.router(hidden_states).float()).gather(1, top_k_index)  # [N, k]
            if ctx.calibrate is not None:  # calibration: this layer's threshold from its real tokens' pairs
                r = self.routing = replace(r, threshold=ctx.calibrate(r.layer_idx, score[tokens].flatten()))
            hard = score >= r.threshold
        else:
            dropped = torch.tensor(r.dropped_experts, dtype=top_k_index.dtype, device=top_k_index.device)
            hard = ~torch.isin(top_k_index, dropped)
        hard = hard & tokens[:, None]  # padding tokens are never executed
        weight = tokens[:, None].expand(N, k).to(top_k_weights.dtype)
        keep = hard.to(top_k_weights.dtype)
        if train_ste and score is not None:
            keep = keep + (score - score.detach()).to(keep.dtype)
        ctx.trace.decisions.append(ExpertDecision(r.layer_idx, keep, weight, score, experts=top_k_index,
                                                  gate_weights=top_k_weights, num_experts=r.num_experts))

        if not train_ste and bool((hard | ~tokens[:, None]).all()):
            # no real token's assignment dropped: the original call, bit for bit (padding rows run too, uncounted)
            return super().forward(hidden_states, top_k_index, top_k_weights)
        if masked:
            return super().forward(hidden_states, top_k_index, top_k_weights * keep)
        rows, slots = hard.nonzero(as_tuple=True)  # [K] kept (token, slot) pairs
        out = torch.zeros_like(hidden_states)
        if rows.numel() == 0:
            return out
        w = top_k_weights[rows, slots] * keep[rows, slots] if train_ste else top_k_weights[rows, slots]  # STE value 1
        kept = super().forward(hidden_states.index_select(0, rows), top_k_index[rows, slots][:, None],
                               w[:, None])  # [K, d]: each expert runs on its kept tokens
        return out.index_add_(0, rows, kept.to(out.dtype))

    @staticmethod
    def _token_mask(ctx: RoutingContext, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: which of the flattened ``B*T`` tokens of ``hidden_states`` [N, d] are real (the context's
        ``token_mask``, made once per forward for all routed layers)."""
        N = hidden_states.shape[0]
        B = 1 if ctx.attention_mask is None else ctx.attention_mask.shape[0]
        if N % B:
            raise ValueError(f"experts got {N} tokens, not a multiple of the batch size {B}")
        return ctx.token_mask(hidden_states.reshape(B, N // B, -1)).reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# Attaching


def _distribute_context(model, args, kwargs):
    """Model pre-hook: make the forward's ``RoutingContext`` (created by ``routing``'s hook if absent) visible to the
    routed experts modules, which are called without keyword arguments by their MoE block."""
    args, kwargs = routing_pre_hook(model, args, kwargs)
    for i in model.routertune.layers:
        decoder_layers(model)[i].get_submodule(model.routertune.module_path)._routing_context = kwargs["routing_context"]
    return args, kwargs


def _clear_context(model, args, kwargs, output):
    output = routing_post_hook(model, args, kwargs, output)
    for i in model.routertune.layers:
        decoder_layers(model)[i].get_submodule(model.routertune.module_path)._routing_context = None
    return output


def _attach(model: nn.Module, config: RouterConfig, dropped: dict[int, list[int]] | None) -> nn.Module:
    if getattr(model, "routertune", None) is not None:
        raise ValueError("This model already has routers; call detach_routers(model) first.")
    spec = moe_spec(model)
    layers = decoder_layers(model)
    indices = config.resolve_layers(len(layers))
    not_moe = [i for i in indices if _experts_module(layers[i], spec) is None]
    if not_moe:
        raise ValueError(f"layers {not_moe} of this {model.config.model_type} model have no MoE experts module; "
                         f"MoE layers: {moe_layers(model)} (use expert_router_config(model))")
    for i in indices:
        experts = _experts_module(layers[i], spec)
        ref = next(experts.parameters())
        E = experts.num_experts
        drop = tuple(sorted(set(dropped.get(i, ())))) if dropped is not None else ()
        if any(not 0 <= e < E for e in drop):
            raise ValueError(f"layer {i}: dropped experts {list(drop)} out of range [0, {E})")
        experts.__class__ = mixed_class(ExpertRoutingMixin, type(experts))
        experts.routing = ExpertRouting(i, E, config.threshold, drop)
        experts.router = None
        if dropped is None:
            experts.router = zero_router(model.config.hidden_size, E, config.router_bias, ref)
        experts._routing_context = None
    setup = RoutingSetup(config=config, layers=indices, static=dropped is not None, module_path=spec.experts)
    setup.hooks = [
        model.register_forward_pre_hook(_distribute_context, with_kwargs=True),
        model.register_forward_hook(_clear_context, with_kwargs=True),
    ]
    model.routertune = setup
    return model


def attach_expert_routers(model: nn.Module, config: RouterConfig, *, static_drop: bool = False) -> nn.Module:
    """Zero-initialised expert routers on ``config``'s MoE layers, in place (what ``attach_routers`` calls for
    ``target="experts"``); a freshly routed model computes exactly the original model."""
    if config.target != EXPERTS:
        raise ValueError(f"attach_expert_routers needs RouterConfig(target={EXPERTS!r}), got {config.target!r}")
    if static_drop:
        raise ValueError("static drop of experts names the experts to drop: use moe.attach_expert_drop(model, "
                         "{layer: [experts]}) (see expert_drop_plan)")
    return _attach(model, config, None)


register_target(EXPERTS, attach_expert_routers, levels=("token",))


def attach_expert_drop(model: nn.Module, dropped: dict[int, list[int]]) -> nn.Module:
    """Expert Drop: remove ``dropped`` (``{layer: [expert, ...]}``) for every token, in place, through the real-skip
    path. Every MoE layer is attached (layers without dropped experts run unchanged but are counted in the trace, so
    the executed fraction is over all MoE layers, as for expert routers)."""
    unknown = sorted(set(dropped) - set(moe_layers(model)))
    if unknown:
        raise ValueError(f"layers {unknown} are not MoE layers of this model; MoE layers: {moe_layers(model)}")
    return _attach(model, expert_router_config(model), {int(i): list(e) for i, e in dropped.items()})


# ----------------------------------------------------------------------------------------------------------------
# Statistics, importance, Expert Drop plan


@torch.no_grad()
def expert_statistics(model: nn.Module, data, tokenizer=None, max_length: int = 2048, batch_size: int = 8
                      ) -> pd.DataFrame:
    """Per (MoE layer, expert) counts over ``data`` (texts or conversations with ``tokenizer``, or batches
    ``{"input_ids", "attention_mask"}``), in the model's routing mode.

    Columns: layer, expert, assigned (real tokens the gate sent to the expert), executed (of those, the ones the
    expert ran: kept by its router / not dropped), weight_mass (sum of the gate's routing weights over the assigned
    tokens: the Expert Drop importance). A model without expert routers is measured through temporary zero routers
    (= the original model; executed == assigned).
    """
    temporary = getattr(model, "routertune", None) is None
    if temporary:
        attach_expert_routers(model, expert_router_config(model))
    elif model.routertune.config.target != EXPERTS:
        raise ValueError("expert_statistics needs a model without routers or with expert routers")
    try:
        device = next(model.parameters()).device
        sums: dict[int, dict[str, torch.Tensor]] = {}
        for b in forward_batches(data, tokenizer, batch_size, max_length, device):
            ctx = RoutingContext(model.routertune.mode, b["attention_mask"], RoutingTrace())
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], routing_context=ctx, use_cache=False)
            for d in ctx.trace.decisions:
                for key, v in d.per_expert().items():
                    acc = sums.setdefault(d.layer, {})
                    acc[key] = acc[key] + v.cpu() if key in acc else v.cpu()
    finally:
        if temporary:
            detach_routers(model)
    rows = [{"layer": i, "expert": e, **{key: float(v[e]) for key, v in s.items()}}
            for i, s in sorted(sums.items()) for e in range(len(s["assigned"]))]
    return pd.DataFrame(rows, columns=["layer", "expert", "assigned", "executed", "weight_mass"])


@torch.no_grad()
def real_vs_masked(model: nn.Module, data, tokenizer=None, max_length: int = 2048, batch_size: int = 8) -> dict:
    """Run ``data`` through a routed model (any routers) in ``real`` and in ``masked`` mode and compare.

    Returns ``{"max_abs_logit_diff", "top1_agreement", "executed_real", "executed_masked", "tokens"}`` over the real
    tokens of ``data`` (texts or conversations with ``tokenizer``, or batches): the fast path's deviation from the
    reference (float accumulation order only, when the implementation is right).
    """
    diff, agree, tokens = 0.0, 0.0, 0.0
    counts = {"real": [0.0, 0.0], "masked": [0.0, 0.0]}
    for b in forward_batches(data, tokenizer, batch_size, max_length, next(model.parameters()).device):
        logits = {}
        for mode in ("real", "masked"):
            with routing_mode(model, mode):
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            logits[mode] = out.logits[b["attention_mask"].bool()].float()  # [n_real, V]
            for e, n in out.routing.counts().values():
                counts[mode][0] += e
                counts[mode][1] += n
        diff = max(diff, float((logits["real"] - logits["masked"]).abs().max()))
        agree += float((logits["real"].argmax(-1) == logits["masked"].argmax(-1)).sum())
        tokens += logits["real"].shape[0]
    return {"max_abs_logit_diff": diff, "top1_agreement": agree / max(tokens, 1.0),
            "executed_real": counts["real"][0] / max(counts["real"][1], 1.0),
            "executed_masked": counts["masked"][0] / max(counts["masked"][1], 1.0), "tokens": int(tokens)}


def normalised_load(stats: pd.DataFrame) -> pd.DataFrame:
    """``stats`` plus ``assigned_load`` / ``executed_load``: each expert's count divided by the mean count of its
    layer's experts (1.0 = a perfectly balanced layer; Figure 8's y axis)."""
    out = stats.copy()
    for col in ("assigned", "executed"):
        mean = out.groupby("layer")[col].transform("mean")
        out[f"{col}_load"] = out[col] / mean.where(mean > 0, math.nan)
    return out


def expert_drop_plan(stats: pd.DataFrame, skip_ratio: float) -> tuple[dict[int, list[int]], float]:
    """The globally least important experts (lowest ``weight_mass`` over all layers) to drop so that the share of
    dropped (token, expert) assignments in ``stats`` is closest to ``skip_ratio``.

    Returns ``({layer: [experts]}, achieved share of assignments)``. Drops at least one expert for ``skip_ratio > 0``.
    """
    if not 0.0 <= skip_ratio < 1.0:
        raise ValueError(f"skip_ratio must be in [0, 1), got {skip_ratio!r}")
    order = stats.sort_values(["weight_mass", "layer", "expert"]).reset_index(drop=True)
    total = float(stats.assigned.sum())
    if total <= 0:
        raise ValueError("expert_drop_plan: the statistics count no assignments")
    share = order.assigned.cumsum() / total  # share dropped after dropping the first n+1 experts
    n = 0 if skip_ratio == 0 else int((share - skip_ratio).abs().idxmin()) + 1
    plan: dict[int, list[int]] = {}
    for r in order.iloc[:n].itertuples():
        plan.setdefault(int(r.layer), []).append(int(r.expert))
    return {i: sorted(e) for i, e in sorted(plan.items())}, float(share.iloc[n - 1]) if n else 0.0


# ----------------------------------------------------------------------------------------------------------------
# A small random MoE model with a real tokenizer (smoke / cpu profiles)


def tiny_random_moe(tokenizer_from: str = "smollm2-135m", num_layers: int = 4, hidden_size: int = 64,
                    intermediate_size: int = 128, num_experts: int = 8, top_k: int = 2, seed: int = 0,
                    model_type: str = "olmoe"):
    """``(model, tokenizer)``: a randomly initialised MoE decoder (default OLMoE architecture) with the real
    tokenizer of ``tokenizer_from`` (built-in name or model directory), float32, eval mode.

    intermediate_size: each expert's FFN width. No pretrained MoE can be had offline, so this is what the smoke and
    cpu profiles measure: mechanics (executed fraction, load, real-skip speed), not accuracy.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in MOE_FAMILIES:
        raise ValueError(f"tiny_random_moe: model_type must be one of {sorted(MOE_FAMILIES)}, got {model_type!r}")
    tokenizer = load_tokenizer(tokenizer_from)
    heads = max(1, hidden_size // 32)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        moe_intermediate_size=intermediate_size, num_hidden_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=heads, num_experts=num_experts, num_local_experts=num_experts,
        n_routed_experts=num_experts, num_experts_per_tok=top_k, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.name_or_path = (f"tiny-random-{model_type}-L{num_layers}-d{hidden_size}-E{num_experts}-k{top_k}"
                                 f"-ff{intermediate_size}-{tokenizer_from}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


__all__ = [
    "ExpertDecision", "ExpertRouting", "ExpertRoutingMixin", "MOE_FAMILIES", "MoESpec", "attach_expert_drop",
    "attach_expert_routers", "expert_drop_plan", "expert_router_config", "expert_statistics", "moe_layers",
    "moe_spec", "normalised_load", "real_vs_masked", "tiny_random_moe",
]
