"""Static-drop baselines: the paper's Layer Drop / Attention Drop (LLM-Drop).

A module's importance is one minus the cosine similarity between the hidden states entering and leaving its
residual step, averaged over the real tokens of calibration data; the least important modules are dropped for every
input. Dropping runs through the routing machinery (``attach_routers(..., static_drop=True)``), so a static drop and a
router skipping the same amount of work execute the same real-skip code.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .architectures import arch_spec, decoder_layers
from .routing import RouterConfig, attach_routers


@torch.no_grad()
def module_importance(model: nn.Module, batches: Iterable[dict]) -> dict[str, dict[int, float]]:
    """LLM-Drop importance of every layer's ``attn``, ``mlp`` and ``block``: ``{target: {layer: 1 - cos}}``.

    batches: dicts with ``input_ids`` ``[B, T]`` and optionally ``attention_mask`` ``[B, T]`` (1 = real token).
    For layer ``i``: attn compares the layer input with the residual stream after attention; mlp compares that with
    the layer output; block compares the layer input with the layer output.
    """
    if getattr(model, "routertune", None) is not None:
        raise ValueError("module_importance measures the dense model: call it before attach_routers")
    arch = arch_spec(model)
    layers = decoder_layers(model)
    sums = {t: torch.zeros(len(layers), dtype=torch.float64) for t in ("attn", "mlp", "block")}
    count = 0.0
    seen: dict[int, dict[str, torch.Tensor]] = {}
    real: torch.Tensor | None = None  # [B, T] weights of the current batch

    def similarity(a, b):  # mean over real tokens of cos(a, b); a, b: [B, T, d]
        cos = nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
        return float((cos * real).sum())

    def on_input(i):
        def hook(module, args, kwargs):
            seen[i] = {"in": kwargs.get("hidden_states", args[0] if args else None)}

        return hook

    def on_mid(i):
        def hook(module, args):
            seen[i]["mid"] = args[0]

        return hook

    def on_output(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            h_in, h_mid = seen[i]["in"], seen[i]["mid"]
            sums["attn"][i] += similarity(h_in, h_mid)
            sums["mlp"][i] += similarity(h_mid, out)
            sums["block"][i] += similarity(h_in, out)

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(on_input(i), with_kwargs=True))
        handles.append(layer.get_submodule(arch.pre_mlp_norm).register_forward_pre_hook(on_mid(i)))
        handles.append(layer.register_forward_hook(on_output(i), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            real = mask.float()
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)  # the hooks need no logits
            count += float(real.sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("module_importance got no tokens: pass at least one non-empty batch")
    return {t: {i: 1.0 - float(s[i]) / count for i in range(len(layers))} for t, s in sums.items()}


def least_important(importance: dict[int, float], num_drop: int, candidates: Iterable[int] | None = None) -> list[int]:
    """The ``num_drop`` layers with the lowest importance among ``candidates`` (default: all), sorted."""
    pool = sorted(importance if candidates is None else candidates, key=lambda i: importance[i])
    if not 0 <= num_drop <= len(pool):
        raise ValueError(f"num_drop must be in [0, {len(pool)}], got {num_drop}")
    return sorted(pool[:num_drop])


def attach_static_drop(model: nn.Module, target: str, layers: list[int]) -> nn.Module:
    """Skip ``target`` (attn, mlp or block) of ``layers`` for every input, through the real-skip path."""
    return attach_routers(model, RouterConfig(target=target, level="sequence", layers=layers), static_drop=True)
