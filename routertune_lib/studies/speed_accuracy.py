"""Notebook 02: speed vs accuracy of a tuned attention router against static attention drop and a random router
(the capacity sweep), Figure 2 (router vs Layer Drop at 25% overall skipping, attention and MLP) and Figure 4 (skip
ratio per routed layer)."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..baselines import attach_static_drop, least_important, module_importance
from ..evaluation import PAPER_TASKS, compare, task_prompts
from ..experiments import (accuracy_table, comparison_frame, conversation_batches, executed_fractions,
                           load_base_model, measure_speedups, overall_skip, profile_train_config, randomize_routers,
                           routed_copy, speedup_cells, tuned_routers)
from ..paper import PAPER_FIGURE2, PAPER_FIGURE4
from ..plots import baseline, ci_yerr, save_figure
from ..routing import RouterConfig, attach_routers, load_routers, set_thresholds
from .protocol import (CALIB_MAX_LENGTH, Study, calibrate, evaluate_setting, mindskip_config, resolved, shots_label,
                       timing_pool)

NAME = "02_speed_accuracy"
SETTINGS = {  # evaluation and timing sizes; model + tuning budget come from experiments.PROFILES (shared by notebooks)
    "smoke": dict(tasks=["piqa", "boolq"], shots=0, limit=8, capacities=[1.0, 0.5, 0.25], calib_per_layer=True,
                  speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    "cpu": dict(tasks=["piqa", "arc_challenge", "openbookqa"], shots=0, limit=120, capacities=[1.0, 0.75, 0.5, 0.25],
                calib_per_layer=False, speed=dict(batch_size=4, prompt_len=128, num_prompts=4, new_tokens=16,
                                                  repeats=2)),
    "paper": dict(tasks=list(PAPER_TASKS), shots=None, limit=None,
                  capacities=[1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25], calib_per_layer=True,
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=128, repeats=3)),
}
METHODS = {"router": "Router-Tuning", "random": "random router", "static": "static attention drop"}
FIGURE2_CAPACITY = 0.5  # capacity 0.5 of half the layers = 25% overall skipping


def run(profile: str) -> Study:
    """Tune (cached) attention and MLP routers, sweep the capacities, assemble Figures 2 and 4; writes the tables
    ``speed_accuracy`` (one row per method x capacity), ``figure2``, ``figure2_router_minus_drop``,
    ``figure4_skip_ratio`` and ``run.json``."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    if FIGURE2_CAPACITY not in S["capacities"]:
        raise ValueError(f"capacities {S['capacities']} must include {FIGURE2_CAPACITY} (Figure 2's point)")
    print(f"profile {profile}: model {study.model_label}; tuning {P['train_samples']} conversations; "
          f"calibration {P['calib_samples']} unlabelled task prompts; tasks {S['tasks']}, {shots_label(S)}, "
          f"limit {S['limit']} docs each; capacities {S['capacities']}; speed {S['speed']}")

    model, tokenizer = load_base_model(P["model"])
    N = model.config.num_hidden_layers
    train_config = profile_train_config(profile)
    n = P["calib_samples"]
    prompts = task_prompts(S["tasks"], 2 * n)  # 0-shot contexts from the tasks' training splits
    calibration, probe = prompts[:n], prompts[n:]  # probe: Figure 4, unseen
    pool = timing_pool(tokenizer, S["tasks"], S["speed"])
    paths = {t: tuned_routers(P["model"], mindskip_config(N, target=t), train_config,
                              num_samples=P["train_samples"], model=model, tokenizer=tokenizer)
             for t in ("attn", "mlp")}
    importance = module_importance(model, conversation_batches(calibration, tokenizer, CALIB_MAX_LENGTH,
                                                               device=model.device))
    layers = RouterConfig(num_layers=N // 2).resolve_layers(N)
    dense = evaluate_setting(model, tokenizer, S)
    print(f"{N} layers, routed {layers}")
    k = round(len(layers) * (1 - FIGURE2_CAPACITY))
    study.info.update(num_hidden_layers=N, routed_layers=layers, dropped_at_figure2=k)

    routed = load_routers(copy.deepcopy(model), paths["attn"])
    evals = _sweep(study, model, tokenizer, routed, dense, importance, layers, calibration, pool)
    _figure2(study, model, tokenizer, paths["mlp"], dense, evals, importance, layers, calibration)
    _figure4(study, routed, tokenizer, importance, layers, k, calibration, probe)
    study.finish(train_config=train_config.to_dict(), router_checkpoints={t: str(p) for t, p in paths.items()},
                 routed_layers=layers)
    return study


def _sweep(study, model, tokenizer, routed, dense, importance, layers, calibration, timing_pool) -> dict:
    """Router / random router / static drop at every capacity: accuracy (paired CI vs dense) and speed-up."""
    S, N = study.settings, study.info["num_hidden_layers"]
    random_router = attach_routers(copy.deepcopy(model), RouterConfig(target="attn", level="sequence",
                                                                      num_layers=N // 2))
    randomize_routers(random_router, seed=0)
    evals, sweep = {}, []
    for c in S["capacities"]:
        k = round(len(layers) * (1 - c))
        if c == 1.0 or k == 0:
            for m in METHODS:
                evals[m, c] = dense
                sweep.append({"method": m, "capacity": c, "dropped_layers": 0, **speedup_cells(None), "generate_s": None,
                              "skipped share (timing)": 0.0})
            continue
        calibrate(routed, calibration, c, S["calib_per_layer"], tokenizer)
        calibrate(random_router, calibration, c, S["calib_per_layer"], tokenizer)
        dropped = least_important(importance["attn"], k, candidates=layers)
        with routed_copy(model) as static:
            attach_static_drop(static, "attn", dropped)
            models = {"router": routed, "random": random_router, "static": static}
            for m, mod in models.items():
                evals[m, c] = evaluate_setting(mod, tokenizer, S)
            sp = measure_speedups(model, models, timing_pool, **S["speed"]).set_index("setting")
        for m in METHODS:
            sweep.append({"method": m, "capacity": c, "dropped_layers": k if m == "static" else 0,
                          **speedup_cells(sp.loc[m]), "generate_s": sp.loc[m, "generate_s"],
                          "skipped share (timing)": sp.loc[m, "skipped_share"]})
    del random_router
    sweep = pd.DataFrame(sweep)
    for col, f in [("skipped share", lambda e: overall_skip(e, N)),
                   ("executed", lambda e: e.routing.get("overall", 1.0))]:
        sweep[col] = [f(evals[m, c]) for m, c in zip(sweep.method, sweep.capacity)]
    acc = []
    for m, c in zip(sweep.method, sweep.capacity):
        e = evals[m, c]
        d = compare(dense, e)["average"] if e is not dense else {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
        acc.append({"avg": 100 * np.mean([e.tasks[t].score for t in S["tasks"]]), "diff": 100 * d["diff"],
                    "ci_low": 100 * d["ci_low"], "ci_high": 100 * d["ci_high"]})
    sweep = study.table("speed_accuracy", pd.concat([sweep, pd.DataFrame(acc)], axis=1))
    w = (sweep.ci_high - sweep.ci_low)[sweep.capacity < 1]
    print(f"n per task {dense.tasks[S['tasks'][0]].n}; 95% CI width of the average difference "
          f"{w.min():.1f}..{w.max():.1f}")
    return evals


def _figure2(study, model, tokenizer, mlp_path, dense, evals, importance, layers, calibration) -> None:
    """Router vs Layer Drop, attention and MLP, at capacity 0.5 of the routed layers."""
    S, N, k = study.settings, study.info["num_hidden_layers"], study.info["dropped_at_figure2"]
    fig2 = {"attn_layerdrop": evals["static", FIGURE2_CAPACITY], "attn_router": evals["router", FIGURE2_CAPACITY]}
    with routed_copy(model, mlp_path) as mlp_router:
        calibrate(mlp_router, calibration, FIGURE2_CAPACITY, S["calib_per_layer"], tokenizer)
        fig2["mlp_router"] = evaluate_setting(mlp_router, tokenizer, S)
    with routed_copy(model) as mlp_drop:
        attach_static_drop(mlp_drop, "mlp", least_important(importance["mlp"], k, candidates=layers))
        fig2["mlp_layerdrop"] = evaluate_setting(mlp_drop, tokenizer, S)
    fig2 = {n: fig2[n] for n in ("mlp_layerdrop", "mlp_router", "attn_layerdrop", "attn_router")}
    f2 = accuracy_table({"dense": dense, **fig2}, baseline="dense")
    f2["skipped share"] = [0.0] + [overall_skip(e, N) for e in fig2.values()]
    for t in S["tasks"]:
        f2[f"{t} (paper)"] = [None] + [PAPER_FIGURE2[n].get(t) for n in fig2]
    pairs = {tg: comparison_frame(compare(fig2[f"{tg}_layerdrop"], fig2[f"{tg}_router"])) for tg in ("attn", "mlp")}
    study.table("figure2", f2)
    study.table("figure2_router_minus_drop", pd.concat([p.assign(target=tg) for tg, p in pairs.items()]))


def _figure4(study, routed, tokenizer, importance, layers, k, calibration, probe) -> None:
    """Skip ratio per routed layer on held-out prompts: one global threshold at capacity 0.5, the trained threshold
    0.5, and Layer Drop's all-or-nothing."""
    calibrate(routed, calibration, FIGURE2_CAPACITY, False, tokenizer)
    skip = lambda: {i: 1 - f
                    for i, f in executed_fractions(routed, probe, tokenizer, CALIB_MAX_LENGTH)["layers"].items()}
    skip_global = skip()
    set_thresholds(routed, 0.5)
    skip_native = skip()
    dropped = least_important(importance["attn"], k, candidates=layers)
    study.table("figure4_skip_ratio", pd.DataFrame({
        "layer": layers, "router (global threshold, capacity 0.5)": [skip_global[i] for i in layers],
        "router (trained threshold 0.5)": [skip_native[i] for i in layers],
        "layer drop": [1.0 if i in dropped else 0.0 for i in layers]}))


def plot_sweep(study: Study):
    """Accuracy (paired 95% CI vs dense) against measured speed-up, one line per method; saves speed_accuracy.png."""
    sweep = study.tables["speed_accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, label), marker in zip(METHODS.items(), "os^"):
        g = sweep[sweep.method == m].sort_values("capacity", ascending=False)
        ax.errorbar(g.speedup, g.avg, yerr=ci_yerr(g), marker=marker, capsize=3, label=label)
        for _, r in g[g.capacity < 1].iterrows():
            ax.annotate(f"{r.capacity:g}", (r.speedup, r.avg), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter([1.0], [_dense_avg(sweep)], s=120, marker="*", color="black", zorder=5, label="dense")
    ax.set_xlabel("end-to-end generation speed-up over dense (x, real skipping)")
    ax.set_ylabel(f"average accuracy (%), {len(study.settings['tasks'])} tasks")
    ax.set_title(f"Speed vs accuracy ({study.model_label}, {study.profile}); labels: capacity")
    ax.legend(fontsize=8)
    save_figure(fig, study.out_dir, "speed_accuracy")
    return fig


def plot_figure2(study: Study):
    """Per-task accuracy of Router-Tuning and Layer Drop (attention, MLP) with dense; saves figure2.png."""
    f2, tasks = study.tables["figure2"], study.settings["tasks"]
    N, k = study.info["num_hidden_layers"], study.info["dropped_at_figure2"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = np.arange(len(tasks))
    settings = [s for s in f2.setting if s != "dense"]
    for i, n in enumerate(settings):
        ax.bar(x + (i - 1.5) * 0.2, [f2.loc[f2.setting == n, t].item() for t in tasks], 0.2, label=n)
    ax.scatter(x, [f2.loc[0, t] for t in tasks], marker="_", s=600, color="black", label="dense", zorder=5)
    ax.set_xticks(x, tasks)
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Figure 2: {k} of {N} layers' worth skipped (~{100 * k / N:.0f}% of attention / MLP work)")
    ax.legend(fontsize=8, ncol=3)
    save_figure(fig, study.out_dir, "figure2")
    return fig


def plot_figure4(study: Study):
    """Skip ratio per routed layer (router, global and trained threshold; Layer Drop); saves figure4_skip_ratio.png."""
    f4 = study.tables["figure4_skip_ratio"]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    x = np.arange(len(f4))
    for i, col in enumerate(f4.columns[1:]):
        ax.bar(x + (i - 1) * 0.27, f4[col], 0.27, label=col)
    baseline(ax, 0.5, "50% skip", color="gray")
    ax.set_xticks(x, f4.layer)
    ax.set_xlabel("routed layer (0-based)")
    ax.set_ylabel("skip ratio (share of sequences)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Figure 4: attention skip ratio per routed layer")
    ax.legend(fontsize=8)
    save_figure(fig, study.out_dir, "figure4_skip_ratio")
    return fig


def _dense_avg(sweep: pd.DataFrame) -> float:
    return sweep[(sweep.method == "router") & (sweep.capacity == 1.0)].avg.iloc[0]


def verdict(study: Study) -> str:
    """What holds at this scale: the sweep, Figure 2's router − drop per target, Figure 4's skip ratios."""
    sweep, S = study.tables["speed_accuracy"], study.settings
    pts = sweep[sweep.capacity < 1].pivot(index="capacity", columns="method", values="avg")
    spd = sweep[sweep.capacity < 1].pivot(index="capacity", columns="method", values="speedup")
    c = FIGURE2_CAPACITY
    lines = [f"Sweep ({study.model_label}, {study.profile}, tasks {S['tasks']}): the tuned router is more accurate "
             f"than static attention drop at {int((pts.router > pts.static).sum())} of {len(pts)} capacities and than "
             f"random routing at {int((pts.router > pts.random).sum())} of {len(pts)}; at capacity {c}: router "
             f"{pts.router[c]:.1f}% ({spd.router[c]:.2f}x), static drop {pts.static[c]:.1f}% ({spd.static[c]:.2f}x), "
             f"random {pts.random[c]:.1f}% ({spd.random[c]:.2f}x), dense {_dense_avg(sweep):.1f}%."]
    pairs = study.tables["figure2_router_minus_drop"]
    for tg in ("attn", "mlp"):
        a = pairs[pairs.target == tg].set_index("task").loc["average"]
        paper = np.mean([PAPER_FIGURE2[f"{tg}_router"][t] - PAPER_FIGURE2[f"{tg}_layerdrop"][t]
                         for t in PAPER_FIGURE2[f"{tg}_router"]])
        lines.append(f"Figure 2, {tg}: Router-Tuning − Layer Drop = {a['diff']:+.1f} [{a.ci_low:+.1f}, "
                     f"{a.ci_high:+.1f}] points on average "
                     f"({'significant' if resolved(a.ci_low, a.ci_high) else 'not significant'} at 95%); paper "
                     f"(Llama-3-8B, ARC-C/MMLU/OBQA/RTE): {paper:+.1f}.")
    r = study.tables["figure4_skip_ratio"]["router (global threshold, capacity 0.5)"]
    lines.append(f"Figure 4: with one global threshold the routed layers skip {r.min():.0%}–{r.max():.0%} of "
                 f"sequences (mean {r.mean():.0%}; {int((r > 0).sum())} of {len(r)} layers skip some, "
                 f"{int((r < 1).sum())} run for some); paper: {PAPER_FIGURE4['router_skip_min']:.0%}–"
                 f"{PAPER_FIGURE4['router_skip_max']:.0%}, mean {PAPER_FIGURE4['router_skip_mean']:.0%}. Layer Drop "
                 f"removes {study.info['dropped_at_figure2']} of {len(r)} routed layers entirely.")
    return "\n".join(lines)
