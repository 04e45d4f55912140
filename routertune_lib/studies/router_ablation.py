"""Notebook 12: how the routers are trained and how they decide (issue 15, items 3-4).

Trained variants (``TRAININGS``): the capacity loss (``hinge``, the paper's text; ``linear``, the released 2024 code),
the training forward (``masked`` STE over every input; ``real`` skip as in the released code), a learnable per-layer
bias, and the learning rate (the profile's, and 1e-4 from the paper's grid). Each trained router decides by three
rules: the fixed threshold 0.5 it was trained with (no calibration), per-layer calibration and one global threshold,
both calibrated on unlabelled prompts to the executed share of static drop of ``k`` layers. Every setting is scored
on *different* held-out prompts by its per-prompt KL(dense || model), paired with static attention drop of the same
``k`` least important layers and with a random router calibrated per layer (the same executed share).
"""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..baselines import attach_static_drop, least_important, module_importance
from ..dynamics import document_kl, paired_difference
from ..evaluation import task_prompts
from ..experiments import (conversation_batches, load_base_model, profile_train_config, randomize_routers,
                           router_record, skipped_share, tuned_routers)
from ..plots import save_figure
from ..routing import RouterConfig, attach_routers, load_routers
from .protocol import CALIB_MAX_LENGTH, CAPACITY, Study, calibrate, mindskip_config

NAME = "12_router_ablation"
SETTINGS = {  # prompts: 0-shot contexts of these tasks' training splits; the first `calib` calibrate, the rest are held out
    "smoke": dict(tasks=["piqa", "arc_easy", "hellaswag"], calib=8, held_out=12, n_boot=1000, batch_size=8),
    "cpu": dict(tasks=["piqa", "arc_easy", "hellaswag"], calib=48, held_out=150, n_boot=10000, batch_size=16),
    "paper": dict(tasks=["piqa", "arc_easy", "hellaswag"], calib=256, held_out=1000, n_boot=10000, batch_size=16),
}
# name: (RouterConfig overrides, TrainConfig overrides of the profile's)
TRAININGS = {
    "hinge, masked, profile lr": ({}, {}),
    "hinge, masked, lr 1e-4": ({}, dict(learning_rate=1e-4)),
    "hinge, masked, bias, lr 1e-4": (dict(router_bias=True), dict(learning_rate=1e-4)),
    "hinge, real-skip, lr 1e-4": ({}, dict(training_forward="real", learning_rate=1e-4)),
    "linear, real-skip, lr 1e-4 (released code)": (dict(capacity_loss="linear"),
                                                   dict(training_forward="real", learning_rate=1e-4)),
}
RULES = ("threshold 0.5", "per-layer calibration", "global calibration")
TOLERANCE = 0.05  # issue 15: trained with the fixed threshold, the held-out executed share must be within this
SHARE_TOLERANCE = 0.01  # skipped share of all layers' attention (0.3 of a layer of 30) counted as the same share


def run(profile: str) -> Study:
    """Train (or load from the cache) each variant, decide by each rule and score on held-out prompts. Writes
    ``training`` (per variant: steps, executed share at threshold 0.5 on held-out prompts, whether it is within
    ``TOLERANCE`` of the target, per-layer spread), ``layer_keep`` (per variant and layer, threshold 0.5),
    ``fidelity`` (per setting: executed share, mean KL and the paired differences to static drop and to the random
    router, with verdicts), ``document_kl`` (per prompt) and ``run.json``."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    model, tokenizer = load_base_model(P["model"])
    N = model.config.num_hidden_layers
    base = mindskip_config(N)
    layers = base.resolve_layers(N)
    k = int(len(layers) * (1 - CAPACITY))  # static drop of k layers; routers calibrated to the same executed share
    capacity = 1 - k / len(layers)
    prompts = task_prompts(S["tasks"], S["calib"] + S["held_out"])
    calibration, held_out = prompts[: S["calib"]], prompts[S["calib"]:]
    print(f"profile {profile}: model {study.model_label}; {len(layers)} routed layers {layers[0]}..{layers[-1]}; "
          f"static drop of {k} layers, routers calibrated to {capacity:.3f}; {len(calibration)} calibration and "
          f"{len(held_out)} held-out prompts of {S['tasks']}")

    importance = module_importance(model, conversation_batches(calibration, tokenizer, CALIB_MAX_LENGTH,
                                                               device=model.device))["attn"]
    static = attach_static_drop(copy.deepcopy(model), "attn", least_important(importance, k, layers))
    random = attach_routers(copy.deepcopy(model), RouterConfig(target="attn", level="sequence", layers=layers))
    randomize_routers(random, seed=0)
    calibrate(random, calibration, capacity, True, tokenizer)
    baselines = {"static attention drop": static, "random router, per-layer calibration": random}
    kl, executed = document_kl(model, baselines, tokenizer, held_out, batch_size=S["batch_size"])
    del static, random

    trained, keep_rows, records = [], [], {}
    for name, (router_overrides, train_overrides) in TRAININGS.items():
        config = RouterConfig(**{**vars(base), **router_overrides})  # the key of the other studies' routers
        train_config = profile_train_config(profile, **train_overrides)
        path = tuned_routers(P["model"], config, train_config, num_samples=P["train_samples"], model=model,
                             tokenizer=tokenizer)
        records[name] = {**router_record(path), "path": str(path)}
        routed = {}
        for rule in RULES:
            r = load_routers(copy.deepcopy(model), path)
            if rule != "threshold 0.5":
                calibrate(r, calibration, capacity, rule == "per-layer calibration", tokenizer)
            routed[f"{name} | {rule}"] = r
        t, e = document_kl(model, routed, tokenizer, held_out, batch_size=S["batch_size"])
        kl = kl.merge(t, on=["doc", "tokens"])
        executed.update(e)
        at_half = e[f"{name} | threshold 0.5"]
        shares = np.array(list(at_half["layers"].values()))
        trained.append({
            "variant": name, "capacity_loss": config.capacity_loss, "training_forward": train_config.training_forward,
            "router_bias": config.router_bias, "lr": train_config.learning_rate, "steps": records[name]["steps"],
            "train capacity (last step)": records[name].get("final_capacity"),
            "held-out executed at 0.5": at_half["overall"],
            "within target ±0.05": bool(abs(at_half["overall"] - CAPACITY) <= TOLERANCE),
            "layer min": shares.min(), "layer max": shares.max(),
            "dynamic layers (0 < share < 1)": int(((shares > 0) & (shares < 1)).sum()), "layers": len(shares)})
        keep_rows += [{"variant": name, "layer": i, "executed share": s} for i, s in at_half["layers"].items()]
        del routed

    study.table("training", pd.DataFrame(trained))
    study.table("layer_keep", pd.DataFrame(keep_rows))
    study.table("document_kl", kl, floatfmt=".5f")
    study.table("fidelity", fidelity_table(kl, executed, N, S["n_boot"]), floatfmt=".4f")
    study.info.update(static_k=k, capacity=capacity, layers=layers, num_hidden_layers=N)
    study.finish(routed_layers=layers, static_k=k, calibrated_capacity=capacity, routers=records)
    return study


def fidelity_table(kl: pd.DataFrame, executed: dict, num_hidden_layers: int, n_boot: int) -> pd.DataFrame:
    """Per setting (a KL column of ``kl``): executed share of its gated layers, skipped share of all layers'
    attention, mean KL, and the paired difference (setting minus baseline, per prompt, 95% CI) to static drop and to
    the random router, with a verdict.

    executed: ``{setting: {"layers": {layer: executed fraction}, "overall": fraction}}`` (``document_kl``).
    Verdicts assume that skipping more attention never brings a model closer to dense: ``farther`` when the CI is
    above 0 and the setting skips at most ``SHARE_TOLERANCE`` more than the baseline; ``closer`` when the CI is below 0
    and it skips at least the baseline's share minus the tolerance; ``unresolved`` when the CI contains 0 at the same
    share (within the tolerance); otherwise ``other share``.
    """
    skipped = {name: skipped_share(e, num_hidden_layers) for name, e in executed.items()}
    rows = []
    for name in [c for c in kl.columns if c not in ("doc", "tokens")]:
        variant, _, rule = name.partition(" | ")
        row = {"variant": variant, "rule": rule or "baseline", "executed": executed[name]["overall"],
               "skipped (all layers)": skipped[name], "mean KL": float(kl[name].mean())}
        for base, label in (("static attention drop", "static drop"), ("random router, per-layer calibration",
                                                                       "random router")):
            if name == base:
                continue
            d = paired_difference(kl[base], kl[name], n_boot)
            more = skipped[name] - skipped[base]  # > 0: the setting skips more than the baseline
            verdict = ("farther" if d["ci_low"] > 0 and more <= SHARE_TOLERANCE
                       else "closer" if d["ci_high"] < 0 and more >= -SHARE_TOLERANCE
                       else "unresolved" if abs(more) <= SHARE_TOLERANCE and d["ci_low"] <= 0 <= d["ci_high"]
                       else "other share")
            row.update({f"minus {label}": d["diff"], f"{label} ci_low": d["ci_low"], f"{label} ci_high": d["ci_high"],
                        f"vs {label}": verdict})
        rows.append(row)
    return pd.DataFrame(rows)


def figure(study: Study) -> None:
    """Left: each variant's per-layer executed share at threshold 0.5 (no calibration). Right: KL minus static drop
    with its 95% CI per setting (x), at the skipped share of all layers' attention in the label."""
    keep, fid = study.tables["layer_keep"], study.tables["fidelity"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 4.6), gridspec_kw=dict(width_ratios=[1, 1.1], wspace=0.9))
    grid = keep.pivot(index="variant", columns="layer", values="executed share").loc[list(TRAININGS)]
    im = a.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    a.set_yticks(range(len(grid)), grid.index, fontsize=7)
    a.set_xticks(range(grid.shape[1]), grid.columns, fontsize=7)
    a.set_xlabel("layer")
    a.set_title("executed share at threshold 0.5, held-out prompts")
    fig.colorbar(im, ax=a, fraction=0.04)
    d = fid[fid["minus static drop"].notna()].reset_index(drop=True)
    y = np.arange(len(d))
    b.errorbar(d["minus static drop"], y, xerr=[d["minus static drop"] - d["static drop ci_low"],
                                                d["static drop ci_high"] - d["minus static drop"]], fmt="o", capsize=3)
    b.axvline(0, color="grey", lw=0.8)
    b.set_yticks(y, [f"{v} | {r} (skips {s:.3f})" for v, r, s in zip(d.variant, d.rule, d["skipped (all layers)"])],
                 fontsize=6)
    b.set_xlabel("KL(dense || model) minus static attention drop's, per prompt (95% CI); < 0: closer to dense")
    k, N = study.info["static_k"], study.info["num_hidden_layers"]
    b.set_title(f"static drop of {k} layers skips {k / N:.3f} of all attention")
    fig.suptitle(f"{study.model_label}: router training and decision rules (issue 15)")
    save_figure(fig, study.out_dir, "router_ablation")


def verdict(study: Study) -> str:
    """Which variants reach the target at threshold 0.5, and which settings beat static drop at the same share."""
    t, f = study.tables["training"], study.tables["fidelity"]
    reach = t[t["within target ±0.05"]].variant.tolist()
    lines = [f"threshold 0.5 within ±{TOLERANCE} of {CAPACITY} on held-out prompts: {reach or 'none'} "
             f"(held-out shares {', '.join(f'{v:.2f}' for v in t['held-out executed at 0.5'])})"]
    for _, r in f[f["vs static drop"].notna()].iterrows():
        lines.append(f"{r.variant} | {r.rule} (skips {r['skipped (all layers)']:.3f}): KL minus static drop "
                     f"{r['minus static drop']:+.3f} [{r['static drop ci_low']:+.3f}, {r['static drop ci_high']:+.3f}]"
                     f" -> {r['vs static drop']}; vs random router: {r['vs random router']}")
    return "\n".join(lines)
