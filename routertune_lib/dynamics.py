"""Why trained sequence-level routers act as static per-layer switches: score distributions, input geometry, the
two parts of the router weight, fidelity controls at equal per-layer capacities, and training trajectories.

A sequence-level router decides on ``logit_n = w . m_n``, where ``m_n`` ``[d]`` is the mean of the layer's normalised
input over sequence ``n``'s real tokens (``routing.RoutedLayerMixin._decide``). With the centroid ``c = mean_n m_n``
and ``u = c / |c|`` the weight splits into ``w_par = (w . u) u`` and ``w_perp = w - w_par``, so

    logit_n = w_par . m_n  +  w_perp . m_n        mean over n: w . c  +  0

The whole mean offset comes from the centroid part. When the ``m_n`` are nearly parallel the logits spread little
around that offset, and every sequence lands on the same side of a fixed threshold. Whether ``w_perp`` carries
learned information is measured by replacing it (:func:`replace_orthogonal_part`) and comparing the fidelity to the
dense model at equal per-layer capacities (:func:`document_kl`, :func:`fidelity_table`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .batching import collate, num_labels, pad_id, tokenize_conversations
from .evaluation import RoutingStats, bootstrap_ci, closer_verdict, tok_encode
from .experiments import conversation_batches
from .routing import RoutingContext, RoutingTrace, routed_layers
from .training import label_ce_sum


@dataclass
class LayerInputs:
    """What one sequence-level router saw on ``N`` sequences.

    means: ``[N, d]`` float64, the mean of the router's input (the normalised layer input) over each sequence's real
        tokens. logits: ``[N]`` float64, ``means @ weight`` (the router's logit). scores: ``[N]`` router
        probabilities as the routing trace reports them. keep: ``[N]`` bool, the decisions made.
    threshold: the layer's decision threshold (a probability). weight: ``[d]`` float64 router weight.
    """

    layer: int
    means: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor
    keep: torch.Tensor
    threshold: float
    weight: torch.Tensor


def _routers(model) -> dict[int, torch.nn.Module]:
    layers = {i: layer for i, layer in routed_layers(model).items() if layer.router is not None}
    if not layers:
        raise ValueError("the model has no trainable routers (static drop?); attach or load routers first")
    level = model.routertune.config.level
    if level != "sequence":
        raise ValueError(f"router dynamics are defined for sequence-level routers, got level {level!r}")
    return layers


@torch.no_grad()
def router_inputs(model, data, tokenizer=None, batch_size: int = 8, max_length: int = 2048) -> dict[int, LayerInputs]:
    """``{layer: LayerInputs}`` for every routed layer over ``data`` (texts or conversations with ``tokenizer``, or
    ``{input_ids, attention_mask}`` batches), in the model's routing mode and with its current thresholds (upstream
    decisions shape downstream inputs). The router's input is read by a forward hook on ``layer.router``."""
    layers = _routers(model)
    device = next(model.parameters()).device
    batches = conversation_batches(data, tokenizer, max_length, batch_size, device)
    real: torch.Tensor | None = None  # [B, T] of the running batch
    means: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def hook(i):
        def on_router(module, args, output):
            x = args[0].double()  # [B, T, d]
            means[i].append(((x * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1.0)).cpu())

        return on_router

    handles = [layer.router.register_forward_hook(hook(i)) for i, layer in layers.items()]
    scores: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    keep: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    try:
        for b in batches:
            real = b["attention_mask"].double()
            ctx = RoutingContext(model.routertune.mode, b["attention_mask"], RoutingTrace())
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], routing_context=ctx, use_cache=False)
            for d in ctx.trace.decisions:
                if d.layer in layers:
                    scores[d.layer].append(d.score.float().cpu())
                    keep[d.layer].append(d.keep.detach().bool().cpu())
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, layer in layers.items():
        m = torch.cat(means[i])
        w = layer.router.weight.detach().double().cpu()[0]
        out[i] = LayerInputs(i, m, m @ w, torch.cat(scores[i]), torch.cat(keep[i]), layer.routing.threshold, w)
    return out


def score_distributions(inputs: dict[int, LayerInputs]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per_sequence, per_layer)`` tables of router outputs.

    per_sequence: layer, sequence, logit, score, kept.
    per_layer: layer, n, threshold, threshold_logit, logit_mean, logit_std (across sequences, ddof 0), offset_std
    (``(logit_mean - threshold_logit) / logit_std``: how many standard deviations the mean sits from the decision
    boundary; negative = skip side), kept_share and skipped_share (sequences with score >= / < threshold).
    """
    seqs, rows = [], []
    for i, li in inputs.items():
        kept = li.scores >= li.threshold
        seqs.append(pd.DataFrame({"layer": i, "sequence": np.arange(len(li.logits)), "logit": li.logits.numpy(),
                                  "score": li.scores.numpy(), "kept": kept.numpy()}))
        t_logit = math.log(li.threshold / (1 - li.threshold)) if 0 < li.threshold < 1 else math.copysign(
            math.inf, li.threshold - 0.5)
        mean, std = float(li.logits.mean()), float(li.logits.std(unbiased=False))
        share = float(kept.double().mean())
        rows.append({"layer": i, "n": len(li.logits), "threshold": li.threshold, "threshold_logit": t_logit,
                     "logit_mean": mean, "logit_std": std, "offset_std": (mean - t_logit) / std if std > 0 else
                     math.copysign(math.inf, mean - t_logit), "kept_share": share, "skipped_share": 1 - share})
    return pd.concat(seqs, ignore_index=True), pd.DataFrame(rows)


def router_score_distributions(model, data, tokenizer=None, batch_size: int = 8,
                               max_length: int = 2048) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`score_distributions` of :func:`router_inputs` on ``data``: ``(per_sequence, per_layer)``."""
    return score_distributions(router_inputs(model, data, tokenizer, batch_size, max_length))


def decompose(means: torch.Tensor, weight: torch.Tensor,
              centroid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Split the logits ``means @ weight`` (``[N, d] @ [d]``) along ``u = centroid / |centroid|``.

    centroid: ``[d]``, default ``means.mean(0)``. Returns ``w_par``, ``w_perp`` ``[d]`` (``w_par + w_perp ==
    weight``) and their logit parts ``par``, ``perp`` ``[N]`` (``par + perp == means @ weight``).
    """
    c = means.mean(0) if centroid is None else centroid.to(means.dtype)
    u = c / c.norm()
    w = weight.to(means.dtype)
    w_par = (w @ u) * u
    w_perp = w - w_par
    return {"w_par": w_par, "w_perp": w_perp, "par": means @ w_par, "perp": means @ w_perp}


def weight_geometry(inputs: dict[int, LayerInputs], lr: float | None = None) -> pd.DataFrame:
    """Per layer: how parallel the sequence means are, and which part of the router weight makes the logits.

    Columns: layer, n; cos_mean / cos_min (cosine of each sequence mean to the layer centroid); centroid_norm;
    w_norm; w_cos_centroid (cosine of w to the centroid: |w_par| / |w| up to sign); logit_mean (== w . centroid, all
    of it from the centroid part); logit_std; var_par, var_perp, var_cross: shares of the logit variance across
    sequences from the centroid part, the orthogonal part and twice their covariance (they sum to 1);
    sign_alignment: mean over coordinates of sign(w_i) sign(c_i) (+-1 when w is a multiple of sign(c), the direction
    of an Adam step whose gradient is along c). With ``lr``: step_shift_std, ``lr * |c|_1 / logit_std``: how many
    across-sequence standard deviations one Adam step (each coordinate moves by at most about ``lr``) can move the
    mean logit.
    """
    rows = []
    for i, li in inputs.items():
        m, w = li.means, li.weight
        c = m.mean(0)
        parts = decompose(m, w, c)
        var = float(li.logits.var(unbiased=False))
        cov = float(((parts["par"] - parts["par"].mean()) * (parts["perp"] - parts["perp"].mean())).mean())
        cos = F.cosine_similarity(m, c[None], dim=1)
        row = {"layer": i, "n": len(m), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
               "centroid_norm": float(c.norm()), "w_norm": float(w.norm()),
               "w_cos_centroid": float(w @ c / (w.norm() * c.norm()).clamp_min(1e-30)),
               "logit_mean": float(li.logits.mean()), "logit_std": math.sqrt(var),
               "var_par": float(parts["par"].var(unbiased=False)) / var if var > 0 else float("nan"),
               "var_perp": float(parts["perp"].var(unbiased=False)) / var if var > 0 else float("nan"),
               "var_cross": 2 * cov / var if var > 0 else float("nan"),
               "sign_alignment": float((torch.sign(w) * torch.sign(c)).mean())}
        if lr is not None:
            row["step_shift_std"] = lr * float(c.abs().sum()) / math.sqrt(var) if var > 0 else float("inf")
        rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def replace_orthogonal_part(model, centroids: dict[int, torch.Tensor], kind: str = "random", seed: int = 0) -> None:
    """Keep each router's component along its layer's centroid ``[d]`` and replace the orthogonal rest, in place.

    kind: ``"random"``: a seeded Gaussian direction orthogonal to the centroid, scaled to the norm of the part it
    replaces; ``"zero"``: nothing (the router then ranks sequences only by their projection on the centroid).
    """
    if kind not in ("random", "zero"):
        raise ValueError(f"kind must be 'random' or 'zero', got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    for i, layer in _routers(model).items():
        if i not in centroids:
            raise ValueError(f"no centroid for routed layer {i}; centroids cover {sorted(centroids)}")
        w = layer.router.weight
        u = centroids[i].double().cpu()
        u = u / u.norm()
        w0 = w.detach().double().cpu()[0]
        w_par = (w0 @ u) * u
        new = w_par
        if kind == "random":
            r = torch.randn(u.shape, generator=g, dtype=torch.float64)
            r = r - (r @ u) * u
            new = w_par + r / r.norm() * (w0 - w_par).norm()
        w.data.copy_(new.to(w.dtype)[None])


# ----------------------------------------------------------------------------------------------------------------
# Fidelity to the dense model, per document


@torch.no_grad()
def document_kl(dense, models: dict, tokenizer, texts, max_length: int = 2048,
                batch_size: int = 8) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Per-document mean over real next-token positions of KL(p_dense || p_model), for each ``{name: model}``.

    Texts are encoded as an evaluation encodes a context (``evaluation.tok_encode``) and truncated to
    ``max_length`` tokens; every position of a document counts (as ``evaluation.mean_kl``, which is the
    token-weighted mean of these values). Returns ``(table, executed)``: table has one row per text (``doc`` = its
    index, ``tokens``, then one KL column per model); executed is ``{name: {"layers": {layer: executed fraction},
    "overall": fraction}}`` over these texts (routed models only; run in their routing mode).
    """
    if "doc" in models or "tokens" in models:
        raise ValueError("model names 'doc' and 'tokens' are reserved for the table's columns")
    enc = [tok_encode(tokenizer, t)[:max_length] for t in texts]
    empty = [i for i, e in enumerate(enc) if not e]
    if empty:
        raise ValueError(f"texts {empty[:5]} encode to no tokens; pass non-empty texts")
    device = next(dense.parameters()).device
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))  # similar lengths per batch, little padding
    kl = {name: np.zeros(len(enc)) for name in models}
    counts: dict[str, dict[int, list[float]]] = {name: {} for name in models}
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids = pad_sequence([torch.tensor(enc[i]) for i in idx], batch_first=True).to(device)  # [B, T]
        mask = pad_sequence([torch.ones(len(enc[i]), dtype=torch.long) for i in idx], batch_first=True).to(device)
        p = F.log_softmax(dense(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        for name, m in models.items():
            out = m(input_ids=ids, attention_mask=mask, use_cache=False)
            q = F.log_softmax(out.logits.float(), -1)
            per_tok = (p.exp() * (p - q)).sum(-1) * mask  # [B, T]
            kl[name][idx] = (per_tok.sum(1) / mask.sum(1)).cpu().numpy()
            for layer, (e, n) in (out.routing.counts().items() if getattr(out, "routing", None) else ()):
                c = counts[name].setdefault(layer, [0.0, 0.0])
                c[0], c[1] = c[0] + e, c[1] + n
    table = pd.DataFrame({"doc": np.arange(len(enc)), "tokens": [len(e) for e in enc], **kl})
    executed = {name: {"layers": {i: e / n for i, (e, n) in sorted(c.items())},
                       "overall": sum(e for e, _ in c.values()) / sum(n for _, n in c.values())}
                for name, c in counts.items() if c}
    return table, executed


def paired_difference(a, b, n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mean of ``b - a`` over paired documents with its 95% percentile bootstrap CI (documents resampled jointly;
    ``evaluation.bootstrap_ci``): ``{"n", "a", "b", "diff", "ci_low", "ci_high"}``."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired_difference needs two 1-D arrays of the same length >= 2, got {a.shape}, {b.shape}")
    ci = bootstrap_ci(b - a, n_boot, seed)
    return {"n": len(a), "a": float(a.mean()), "b": float(b.mean()), "diff": ci["value"], "ci_low": ci["ci_low"],
            "ci_high": ci["ci_high"]}


def fidelity_table(kl: pd.DataFrame, reference: str, executed: dict[str, dict] | None = None,
                   n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """One row per KL column of :func:`document_kl`'s table: its mean KL and the paired difference to ``reference``.

    Columns: setting, n, executed (overall executed fraction, when given), mean_kl, diff (setting - reference; > 0:
    the reference is closer to the dense model), ci_low, ci_high (95% paired bootstrap over documents), verdict for
    the claim "the reference is closer to the dense model than this setting": ``holds`` (CI above 0), ``reversed``
    (CI below 0) or ``unresolved``.
    """
    names = [c for c in kl.columns if c not in ("doc", "tokens")]
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not among the settings {names}")
    rows = []
    for name in names:
        row = {"setting": name, "n": len(kl), "executed": (executed or {}).get(name, {}).get("overall", float("nan")),
               "mean_kl": float(kl[name].mean())}
        if name == reference:
            row.update(diff=0.0, ci_low=0.0, ci_high=0.0, verdict="reference")
        else:
            d = paired_difference(kl[reference], kl[name], n_boot, seed)
            row.update(diff=d["diff"], ci_low=d["ci_low"], ci_high=d["ci_high"],
                       verdict=closer_verdict(d["ci_low"], d["ci_high"], higher_better=True))  # reference − name
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# Training: what pulls a layer's decision, and the trajectories


def _labelled_batches(model, conversations, tokenizer, max_length: int, batch_size: int) -> tuple[list[dict], int]:
    """Conversations as the trainer sees them: right-padded ``{input_ids, attention_mask, labels}`` batches on the
    model's device (assistant-only labels) and the number of label tokens a causal LM predicts over all of them."""
    device = next(model.parameters()).device
    rows = tokenize_conversations(tokenizer, conversations, max_length)
    pad = pad_id(tokenizer)
    batches = [{k: v.to(device) for k, v in collate(rows[s : s + batch_size], pad).items()}
               for s in range(0, len(rows), batch_size)]
    return batches, sum(map(num_labels, rows))


def decision_pull(model, conversations, tokenizer, max_length: int = 2048, batch_size: int = 8) -> pd.DataFrame:
    """What the trainer's gradient does to each routed layer's decisions: the task loss's pull towards *keep*
    against the capacity loss's push towards *skip*.

    One masked training forward per batch (every input runs, its output times the straight-through decision
    ``keep_{l,n}`` of layer ``l`` for sequence ``n``; ``training._train_step``). ``L_task`` = cross-entropy summed over
    the assistant tokens of all ``conversations`` / their number; ``C`` = the routing capacity of each batch weighted
    by its share of the conversations (the trainer's per-micro-batch mean). Per layer, summed over its decisions:

        pull_l = -sum_n dL_task/dkeep_{l,n}      the slope: first-order estimate of skipping's cost (skip_effect)
        push_l =  sum_n dC/dkeep_{l,n}           1 / (routed layers) when no router is downstream-sensitive

    While the hinge is active (capacity above target) the total gradient on the decisions is
    ``capacity_weight * push_l - pull_l``. The router's logit moves by its sign (nearly the same for every sequence
    when the layer's inputs are parallel; Adam's first step moves it by exactly that sign), so the layer is pushed
    towards skipping iff ``capacity_weight > switch_weight_l = pull_l / push_l``. Gradients are the trainer's,
    including straight-through paths through downstream routers (zero at the zero initialisation).

    The model's routers and thresholds are used as they are (zero-initialised routers: the dense start of training).
    Returns one row per routed layer with a router: layer, pull, push, switch_weight, executed (its executed fraction
    on these conversations).
    """
    layers = _routers(model)
    batches, n_labels = _labelled_batches(model, conversations, tokenizer, max_length, batch_size)
    params = [layer.router.weight for layer in layers.values()]
    flags = [w.requires_grad for w in params]
    sums = {i: np.zeros(4) for i in layers}  # pull, push, executed, total
    try:
        for w in params:
            w.requires_grad_(True)  # the decisions carry the straight-through gradient only while routers train
        n_rows = sum(len(b["input_ids"]) for b in batches)
        for b in batches:
            ctx = RoutingContext("masked", b["attention_mask"], RoutingTrace(), training_forward="masked")
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], routing_context=ctx,
                        use_cache=False)
            decisions = [d for d in ctx.trace.decisions if d.layer in layers]
            keeps = [d.keep for d in decisions]
            task = torch.autograd.grad(label_ce_sum(out.logits, b["labels"]) / n_labels, keeps, retain_graph=True)
            cap = torch.autograd.grad(ctx.trace.capacity() * len(b["input_ids"]) / n_rows, keeps, allow_unused=True)
            for d, g, c in zip(decisions, task, cap):
                sums[d.layer] += [-float((g * d.weight).sum()), 0.0 if c is None else float((c * d.weight).sum()),
                                  float((d.keep.detach() * d.weight).sum()), float(d.weight.sum())]
    finally:
        for w, f in zip(params, flags):
            w.requires_grad_(f)
    return pd.DataFrame([{"layer": i, "pull": v[0], "push": v[1], "switch_weight": v[0] / v[1] if v[1] else math.nan,
                          "executed": v[2] / max(v[3], 1.0)} for i, v in sums.items()])


@torch.no_grad()
def skip_effect(model, conversations, tokenizer, max_length: int = 2048, batch_size: int = 8) -> pd.DataFrame:
    """The finite counterpart of :func:`decision_pull`'s pull: per routed layer with a router, the task loss (as
    there) with that layer forced to keep every sequence and forced to skip every sequence, the others deciding as
    they do (``routing.layer``'s ``fixed_keep``; real-skip forward). ``secant = loss_skip - loss_keep`` is what
    skipping the layer costs; the pull is the slope of the same loss at the current decisions, which the
    straight-through estimator hands the router instead. A layer that already keeps (skips) every sequence takes
    the model's own loss as its loss_keep (loss_skip), so such a layer costs one forward per batch, not two.
    Returns layer, loss_keep, loss_skip, secant."""
    layers = _routers(model)
    batches, n_labels = _labelled_batches(model, conversations, tokenizer, max_length, batch_size)

    def loss() -> tuple[float, RoutingStats]:
        total, stats = 0.0, RoutingStats()
        for b in batches:
            ctx = RoutingContext("real", b["attention_mask"], RoutingTrace())
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], routing_context=ctx,
                        use_cache=False)
            total += float(label_ce_sum(out.logits, b["labels"])) / n_labels
            stats.merge(RoutingStats(ctx.trace.counts()))
        return total, stats

    base, stats = loss()
    shares = stats.summary()["layers"]
    out = []
    for i, layer in layers.items():
        executed = shares[i]
        spec, forced = layer.routing, {}
        try:
            for keep in (True, False):
                if executed == (1.0 if keep else 0.0):
                    forced[keep] = base
                else:
                    layer.routing = replace(spec, fixed_keep=keep)
                    forced[keep] = loss()[0]
        finally:
            layer.routing = spec
        out.append({"layer": i, "loss_keep": forced[True], "loss_skip": forced[False],
                    "secant": forced[False] - forced[True]})
    return pd.DataFrame(out)


def capacity_weight_for(pull: pd.DataFrame, capacity: float) -> float | None:
    """The hinge's ``capacity_weight`` (lambda) that first-order keeps ``k = ceil(capacity * layers)`` routed layers
    on: the geometric mean of the k-th and (k+1)-th largest ``switch_weight`` of :func:`decision_pull`'s table
    (measured at the zero initialisation; half the k-th when the (k+1)-th is not positive), rounded to two
    significant digits. Layers whose switch weight is above it are pulled towards keep, the others pushed towards skip
    while the hinge is active. ``None`` when fewer than ``k`` layers have a positive switch weight: the task loss's own
    gradient then pushes more than ``layers - k`` layers towards skip, and no lambda keeps ``k`` on."""
    if not 0 < capacity < 1:
        raise ValueError(f"capacity must be in (0, 1), got {capacity!r}")
    w = np.sort(pull["switch_weight"].to_numpy(dtype=float))[::-1]
    k = math.ceil(capacity * len(w))
    if k >= len(w) or not w[k - 1] > 0:
        return None
    lam = math.sqrt(w[k - 1] * w[k]) if w[k] > 0 else w[k - 1] / 2
    return float(f"{lam:.2g}")


def capacity_trajectory(train_log: str | Path) -> pd.DataFrame:
    """Per-layer executed fraction over training steps from a ``train_log.csv`` of ``training.train_routers``.

    Returns a long table: step, lr, layer, capacity (the layer's executed fraction on that step's global batch).
    """
    log = pd.read_csv(train_log)
    cols = [c for c in log.columns if c.startswith("capacity_L")]
    if not cols or "step" not in log.columns:
        raise ValueError(f"{train_log} has no per-layer capacity columns (capacity_L<i>); expected a train_log.csv "
                         "written by routertune_lib.training.train_routers")
    long = log[["step", "lr", *cols]].melt(id_vars=["step", "lr"], var_name="layer", value_name="capacity")
    long["layer"] = long["layer"].str.removeprefix("capacity_L").astype(int)
    return long.sort_values(["layer", "step"], ignore_index=True)


def capacity_jumps(trajectory: pd.DataFrame, min_jump: float = 0.5) -> pd.DataFrame:
    """Steps where a layer's capacity changed by at least ``min_jump`` from the previous step: layer, step, lr (of
    that step), before, after."""
    t = trajectory.sort_values(["layer", "step"])
    before = t.groupby("layer")["capacity"].shift()
    jumps = t.assign(before=before, after=t["capacity"])[(t["capacity"] - before).abs() >= min_jump]
    return jumps[["layer", "step", "lr", "before", "after"]].reset_index(drop=True)
