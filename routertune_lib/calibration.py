"""Threshold calibration: set router thresholds so that a target fraction of the inputs executes on given data."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .architectures import base_model
from .batching import forward_batches
from .routing import RoutingContext, RoutingTrace, routed_layers, set_thresholds

logger = logging.getLogger(__name__)


@torch.no_grad()
def _router_scores(model: nn.Module, mode: str, batches: list[dict]) -> dict[int, torch.Tensor]:
    """``{layer: 1-D router probabilities}`` over all sequences (sequence level) or real tokens (token level)."""
    scores: dict[int, list[torch.Tensor]] = {}
    for b in batches:
        ctx = RoutingContext(mode, b["attention_mask"], RoutingTrace())
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], routing_context=ctx, use_cache=False)
        for d in ctx.trace.decisions:
            if d.score is not None:
                scores.setdefault(d.layer, []).append(d.score[d.weight > 0].float().cpu())
    return {i: torch.cat(s) for i, s in scores.items()}


def _one_batch(batches: list[dict]) -> dict[str, torch.Tensor]:
    """``batches`` concatenated, each right-padded (mask 0) to the longest: padding after a row's tokens changes
    neither the positions nor the attention of its real tokens, so every row routes as in its own batch."""
    T = max(b["input_ids"].shape[1] for b in batches)
    return {k: torch.cat([nn.functional.pad(b[k], (0, T - b[k].shape[1])) for b in batches])
            for k in ("input_ids", "attention_mask")}


def threshold_for(scores: torch.Tensor, capacity: float) -> float:
    """Midway between the ``k``-th and ``(k+1)``-th largest score, ``k = round(capacity * n)`` (at least 1):
    ``score >= t`` then holds for exactly ``k`` of these scores when there are no ties, and float noise of a
    re-run (another batch size) cannot flip the boundary input."""
    s = scores.sort(descending=True).values
    k = min(len(s), max(1, int(capacity * len(s) + 0.5)))
    return float(s[k - 1] if k == len(s) else (s[k - 1] + s[k]) / 2)


def calibrate_thresholds(
    model: nn.Module,
    data,
    capacity: float,
    per_layer: bool = True,
    *,
    tokenizer=None,
    batch_size: int = 8,
    max_length: int = 2048,
    rounds: int = 3,
) -> dict[int, float]:
    """Set router thresholds so the executed fraction on ``data`` equals ``capacity``; returns ``{layer: threshold}``.

    data: conversations or plain texts (with ``tokenizer``; batched by ``batch_size`` for the global threshold; e.g.
        ``evaluation.task_prompts`` to calibrate on the kind of text an evaluation routes) or batches
        ``{"input_ids": [B, T], "attention_mask": [B, T]}``. Scores are counted per sequence (sequence level) or per
        real token (token level).
    per_layer=True: layers are calibrated in order, each from its scores on a forward where the layers before it
        already use their new thresholds, so every routed layer executes exactly ``round(capacity * n)`` of its ``n``
        inputs on ``data`` (barring tied scores). One forward: all of ``data`` runs as one batch (the batches
        right-padded to the longest, which changes no real token's computation), and each routed layer sets its
        threshold just before it decides (``RoutingContext.calibrate``); memory grows with ``len(data)`` x the
        longest input, logits are computed for the last position only.
    per_layer=False: one threshold for all layers, the pooled quantile of all layers' scores, re-estimated for
        ``rounds`` passes (skipping upstream changes downstream scores); the executed fraction over all routed
        layers is then close to, not exactly, ``capacity``, and individual layers differ.
    Runs without gradients, in the model's routing mode; a threshold is a score, so it lies in [0, 1].
    """
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must be in (0, 1], got {capacity!r}")
    base = base_model(model)
    batches = forward_batches(data, tokenizer, batch_size, max_length, next(base.parameters()).device)
    mode = base.routertune.mode
    layers = [i for i, layer in routed_layers(base).items() if layer.router is not None]
    was_training = model.training
    model.eval()
    try:
        if per_layer:
            thresholds = {}
            b = _one_batch(batches)
            at_capacity = lambda i, scores: thresholds.setdefault(i, threshold_for(scores.float().cpu(), capacity))
            ctx = RoutingContext(mode, b["attention_mask"], RoutingTrace(), calibrate=at_capacity)
            with torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], routing_context=ctx,
                      use_cache=False, logits_to_keep=1)
            missing = sorted(set(layers) - set(thresholds))
            if missing:
                raise RuntimeError(f"routed layers {missing} did not decide in the calibration forward")
            set_thresholds(base, thresholds)  # already set by the layers; this records them in the config
        else:
            for _ in range(rounds):
                t = threshold_for(torch.cat(list(_router_scores(model, mode, batches).values())), capacity)
                thresholds = {i: t for i in layers}
                set_thresholds(base, thresholds)
    finally:
        model.train(was_training)
    logger.info("calibrated thresholds for capacity %.3f: %s", capacity, thresholds)
    return thresholds
