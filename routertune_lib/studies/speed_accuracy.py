"""Notebook 02: speed vs accuracy of a tuned attention router against static attention drop and a random router
(the capacity sweep), Figure 2 (router vs Layer Drop at 25% overall skipping, attention and MLP) and Figure 4 (skip
ratio per routed layer)."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..baselines import attach_static_drop, least_important, module_importance
from ..evaluation import PAPER_TASKS, fidelity, task_prompts
from ..experiments import (conversation_batches, executed_fractions, load_base_model, measure_speedups,
                           profile_train_config, randomize_routers, routed_copy, speedup_cells, tuned_routers)
from ..paper import PAPER_FIGURE2, PAPER_FIGURE4
from ..plots import save_figure, skip_ratio_bars
from ..routing import RouterConfig, attach_routers, load_routers, set_thresholds
from .protocol import (CALIB_MAX_LENGTH, Study, calibrate, dense_row, mindskip_config, paired_rows, reference_for,
                       score_row, shots_label, task_means, timing_pool)

NAME = "02_speed_accuracy"
SETTINGS = {  # evaluation and timing sizes; model + tuning budget come from experiments.PROFILES (shared by notebooks)
    "smoke": dict(tasks=["piqa", "boolq"], shots=0, limit=8, capacities=[1.0, 0.5, 0.25], calib_per_layer=True,
                  n_boot=1000, speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    # cpu: the tasks SmolLM2-135M is clearly above chance on (results/task_selection); timing: 5 interleaved rounds
    # of batch 8 x 256-token task prompts, 32 new tokens (benchmarks/speed.py times the paper's 512 / 64 workload)
    "cpu": dict(tasks=["arc_easy", "piqa"], shots=0, limit=200, capacities=[1.0, 0.75, 0.5, 0.25],
                calib_per_layer=True, n_boot=2000,
                speed=dict(batch_size=8, prompt_len=256, num_prompts=8, new_tokens=32, repeats=5)),
    "paper": dict(tasks=list(PAPER_TASKS), shots=None, limit=None,
                  capacities=[1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25], calib_per_layer=True, n_boot=2000,
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=128, repeats=5)),
}
METHODS = {"router": "Router-Tuning", "random": "random router", "static": "static attention drop"}
FIGURE2_CAPACITY = 0.5  # capacity 0.5 of half the layers = 25% overall skipping


def run(profile: str) -> Study:
    """Tune (cached) attention and MLP routers, sweep the capacities, assemble Figures 2 and 4. Every setting is
    scored in one pass against the dense model's cached outputs on the same documents (accuracy, and KL(dense ||
    model) per document, paired). Writes the tables ``speed_accuracy`` (one row per method x capacity),
    ``router_minus_baselines`` (paired, with verdicts), ``figure2``, ``figure2_router_minus_drop``,
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
    reference = reference_for(model, tokenizer, S)
    score = lambda m: fidelity(m, tokenizer, reference, n_boot=S["n_boot"])
    print(f"{N} layers, routed {layers}")
    k = round(len(layers) * (1 - FIGURE2_CAPACITY))
    study.info.update(num_hidden_layers=N, routed_layers=layers, dropped_at_figure2=k)

    routed = load_routers(copy.deepcopy(model), paths["attn"])
    scores = _sweep(study, model, tokenizer, routed, score, importance, layers, calibration, pool)
    _figure2(study, model, tokenizer, paths["mlp"], score, scores, importance, layers, calibration)
    _figure4(study, routed, tokenizer, importance, layers, k, calibration, probe)
    study.finish(train_config=train_config.to_dict(), router_checkpoints={t: str(p) for t, p in paths.items()},
                 routed_layers=layers)
    return study


def _sweep(study, model, tokenizer, routed, score, importance, layers, calibration, timing_pool) -> dict:
    """Router / random router / static drop at every capacity: fidelity passes (accuracy and KL, paired vs dense),
    the router minus each baseline (paired), speed-up with its CI and executed FLOP fraction."""
    S, N = study.settings, study.info["num_hidden_layers"]
    random_router = attach_routers(copy.deepcopy(model), RouterConfig(target="attn", level="sequence",
                                                                      num_layers=N // 2))
    randomize_routers(random_router, seed=0)
    scores, sweep, paired = {}, [], []
    for c in S["capacities"]:
        k = round(len(layers) * (1 - c))
        if c == 1.0 or k == 0:
            for m in METHODS:
                scores[m, c] = None
                sweep.append({"method": m, "capacity": c, "dropped_layers": 0, **speedup_cells(None),
                              "flop_fraction": 1.0, "generate_s": None, "skipped share (timing)": 0.0})
            continue
        calibrate(routed, calibration, c, S["calib_per_layer"], tokenizer)
        calibrate(random_router, calibration, c, S["calib_per_layer"], tokenizer)
        dropped = least_important(importance["attn"], k, candidates=layers)
        with routed_copy(model) as static:
            attach_static_drop(static, "attn", dropped)
            models = {"router": routed, "random": random_router, "static": static}
            for m, mod in models.items():
                scores[m, c] = score(mod)
            sp = measure_speedups(model, models, timing_pool, **S["speed"]).set_index("setting")
        for m in METHODS:
            sweep.append({"method": m, "capacity": c, "dropped_layers": k if m == "static" else 0,
                          **speedup_cells(sp.loc[m]), "flop_fraction": sp.loc[m, "flop_fraction"],
                          "generate_s": sp.loc[m, "generate_s"], "skipped share (timing)": sp.loc[m, "skipped_share"]})
        for base in ("static", "random"):
            paired += [{"capacity": c, "router minus": METHODS[base], **r}
                       for r in paired_rows(scores["router", c], scores[base, c], S["n_boot"])]
    del random_router
    dense = dense_row(next(f for f in scores.values() if f is not None))
    cells = pd.DataFrame([dense if scores[r["method"], r["capacity"]] is None
                          else score_row(scores[r["method"], r["capacity"]], S["n_boot"], N) for r in sweep])
    sweep = study.table("speed_accuracy", pd.concat([pd.DataFrame(sweep), cells], axis=1))
    study.table("router_minus_baselines", pd.DataFrame(paired))
    w = (sweep.ci_high - sweep.ci_low)[sweep.capacity < 1]
    wk = (sweep.kl_ci_high - sweep.kl_ci_low)[sweep.capacity < 1]
    print(f"n per task {S['limit']}; 95% CI width of the accuracy difference {w.min():.1f}..{w.max():.1f} points, "
          f"of the KL {wk.min():.3f}..{wk.max():.3f} nats")
    return scores


def _figure2(study, model, tokenizer, mlp_path, score, scores, importance, layers, calibration) -> None:
    """Router vs Layer Drop, attention and MLP, at capacity 0.5 of the routed layers (paired, accuracy and KL)."""
    S, N, k = study.settings, study.info["num_hidden_layers"], study.info["dropped_at_figure2"]
    fig2 = {"attn_layerdrop": scores["static", FIGURE2_CAPACITY], "attn_router": scores["router", FIGURE2_CAPACITY]}
    with routed_copy(model, mlp_path) as mlp_router:
        calibrate(mlp_router, calibration, FIGURE2_CAPACITY, S["calib_per_layer"], tokenizer)
        fig2["mlp_router"] = score(mlp_router)
    with routed_copy(model) as mlp_drop:
        attach_static_drop(mlp_drop, "mlp", least_important(importance["mlp"], k, candidates=layers))
        fig2["mlp_layerdrop"] = score(mlp_drop)
    fig2 = {n: fig2[n] for n in ("mlp_layerdrop", "mlp_router", "attn_layerdrop", "attn_router")}
    ref = fig2["attn_router"]
    rows = [{"setting": "dense", **(100 * task_means(ref).ref_accuracy).to_dict(), **dense_row(ref)}]
    rows += [{"setting": name, **(100 * task_means(fid).accuracy).to_dict(), **score_row(fid, S["n_boot"], N)}
             for name, fid in fig2.items()]
    f2 = pd.DataFrame(rows)
    for t in S["tasks"]:
        f2[f"{t} (paper)"] = [None] + [PAPER_FIGURE2[n].get(t) for n in fig2]
    study.table("figure2", f2)
    study.table("figure2_router_minus_drop", pd.DataFrame(
        [{"target": tg, **r} for tg in ("attn", "mlp")
         for r in paired_rows(fig2[f"{tg}_router"], fig2[f"{tg}_layerdrop"], S["n_boot"])]))


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
    """A 2 x 2 grid, one line per method: accuracy (top, paired 95% CI vs dense) and KL(dense || model) (bottom, 95%
    CI) against the measured speed-up (left, with its CI) and the executed FLOP fraction (right, deterministic);
    saves speed_accuracy.png."""
    sweep = study.tables["speed_accuracy"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    for (m, label), marker in zip(METHODS.items(), "os^"):
        g = sweep[sweep.method == m].sort_values("capacity", ascending=False)
        xerr = [g.speedup - g["speedup ci_low"], g["speedup ci_high"] - g.speedup]
        # per row: the plotted value, and the column its CI is around (accuracy: the paired difference to dense)
        for row, (y, centre, lo, hi) in enumerate([("avg", "diff", "ci_low", "ci_high"),
                                                   ("kl", "kl", "kl_ci_low", "kl_ci_high")]):
            yerr = [g[centre] - g[lo], g[hi] - g[centre]]
            for col, (x, xe) in enumerate([(g.speedup, xerr), (g.flop_fraction, None)]):
                ax = axes[row][col]
                ax.errorbar(x, g[y], xerr=xe, yerr=yerr, marker=marker, capsize=3, label=label)
                for xi, yi, c in zip(x, g[y], g.capacity):
                    if c < 1:
                        ax.annotate(f"{c:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes[0][0].set_ylabel(f"average accuracy (%), {len(study.settings['tasks'])} tasks\n(error bar: paired 95% CI "
                          "of the difference to dense)")
    axes[1][0].set_ylabel("KL(dense || model), nats / token\n(mean per document, 95% CI)")
    for row in axes:
        row[0].set_xlabel("end-to-end generation speed-up over dense (x, real skipping, 95% CI)")
        row[1].set_xlabel("executed FLOP fraction of the timed generation")
        row[1].invert_xaxis()
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Speed vs accuracy and fidelity ({study.model_label}, {study.profile}); labels: capacity")
    fig.tight_layout()
    save_figure(fig, study.out_dir, "speed_accuracy")
    return fig


def plot_figure2(study: Study):
    """Per-task accuracy of Router-Tuning and Layer Drop (attention, MLP) with dense (left), and KL(dense || model)
    with its 95% CI per setting (right); saves figure2.png."""
    f2, tasks = study.tables["figure2"], study.settings["tasks"]
    N, k = study.info["num_hidden_layers"], study.info["dropped_at_figure2"]
    fig, (ax, axk) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    x = np.arange(len(tasks))
    settings = f2[f2.setting != "dense"]
    for i, (_, r) in enumerate(settings.iterrows()):
        ax.bar(x + (i - 1.5) * 0.2, [r[t] for t in tasks], 0.2, label=r.setting)
    ax.scatter(x, [f2.loc[0, t] for t in tasks], marker="_", s=600, color="black", label="dense", zorder=5)
    ax.set_xticks(x, tasks)
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8, ncol=3)
    y = np.arange(len(settings))
    axk.errorbar(settings.kl, y, xerr=[settings.kl - settings.kl_ci_low, settings.kl_ci_high - settings.kl],
                 fmt="o", capsize=3)
    axk.set_yticks(y, settings.setting)
    axk.set_xlabel("KL(dense || model), nats / token (95% CI)")
    fig.suptitle(f"Figure 2: {k} of {N} layers' worth skipped (~{100 * k / N:.0f}% of attention / MLP work)")
    fig.tight_layout()
    save_figure(fig, study.out_dir, "figure2")
    return fig


def plot_figure4(study: Study):
    """Skip ratio per routed layer (router, global and trained threshold; Layer Drop); saves figure4_skip_ratio.png."""
    fig, ax = plt.subplots(figsize=(9, 3.5))
    skip_ratio_bars(ax, study.tables["figure4_skip_ratio"], "Figure 4: attention skip ratio per routed layer")
    ax.set_ylabel("skip ratio (share of sequences)")
    save_figure(fig, study.out_dir, "figure4_skip_ratio")
    return fig


def verdict(study: Study) -> str:
    """What holds at this scale: the router minus each baseline per capacity, Figure 2's router minus drop per
    target, Figure 4's skip ratios (all paired 95% CIs)."""
    S, p, c = study.settings, study.tables["router_minus_baselines"], FIGURE2_CAPACITY
    p = p[p.task == "average"]
    fmt = lambda r, d: f"{r['diff']:+.{d}f} [{r.ci_low:+.{d}f}, {r.ci_high:+.{d}f}] ({r.verdict})"
    lines = [f"Sweep ({study.model_label}, {study.profile}, tasks {S['tasks']}, {shots_label(S)}, {S['limit']} docs "
             "each); router closer to dense than the baseline, accuracy (points) and KL (nats):"]
    for (cap, base), g in p.groupby(["capacity", "router minus"], sort=False):
        g = g.set_index("metric")
        lines.append(f"  capacity {cap:g}, router minus {base}: accuracy {fmt(g.loc['accuracy'], 1)}, "
                     f"KL {fmt(g.loc['kl'], 3)}")
    sweep = study.tables["speed_accuracy"]
    at = sweep[sweep.capacity == c].set_index("method")
    lines.append(f"At capacity {c}: " + "; ".join(
        f"{METHODS[m]} {at.avg[m]:.1f}% ({at.speedup[m]:.2f}x [{at['speedup ci_low'][m]:.2f}, "
        f"{at['speedup ci_high'][m]:.2f}], FLOP fraction {at.flop_fraction[m]:.3f})" for m in METHODS)
        + f"; dense {sweep[sweep.capacity == 1.0].avg.iloc[0]:.1f}%.")
    pairs = study.tables["figure2_router_minus_drop"]
    for tg in ("attn", "mlp"):
        a = pairs[(pairs.target == tg) & (pairs.task == "average")].set_index("metric")
        paper = np.mean([PAPER_FIGURE2[f"{tg}_router"][t] - PAPER_FIGURE2[f"{tg}_layerdrop"][t]
                         for t in PAPER_FIGURE2[f"{tg}_router"]])
        lines.append(f"Figure 2, {tg}: Router-Tuning minus Layer Drop: accuracy {fmt(a.loc['accuracy'], 1)}, "
                     f"KL {fmt(a.loc['kl'], 3)}; paper (Llama-3-8B, ARC-C/MMLU/OBQA/RTE): {paper:+.1f} points.")
    r = study.tables["figure4_skip_ratio"]["router (global threshold, capacity 0.5)"]
    lines.append(f"Figure 4: with one global threshold the routed layers skip {r.min():.0%}–{r.max():.0%} of "
                 f"sequences (mean {r.mean():.0%}; {int((r > 0).sum())} of {len(r)} layers skip some, "
                 f"{int((r < 1).sum())} run for some); paper: {PAPER_FIGURE4['router_skip_min']:.0%}–"
                 f"{PAPER_FIGURE4['router_skip_max']:.0%}, mean {PAPER_FIGURE4['router_skip_mean']:.0%}. Layer Drop "
                 f"removes {study.info['dropped_at_figure2']} of {len(r)} routed layers entirely.")
    return "\n".join(lines)
