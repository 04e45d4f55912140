"""Notebook 07: which instruction data and how much of it (Table 6 and Figure 7)."""

from __future__ import annotations

from dataclasses import asdict

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..data import OFFLINE_MIX, OFFLINE_SOURCES, load_instruction_data
from ..evaluation import PAPER_TASKS, task_prompts
from ..experiments import load_base_model, profile_train_config
from ..paper import PAPER_FIGURE7, PAPER_TABLE6
from ..plots import baseline, ci_yerr, diff_bars, save_figure
from .protocol import (CAPACITY, Study, dense_row, mindskip_config, reference_for, score_row, shots_label, task_means,
                       tuned_run)

NAME = "07_training_data"
SETTINGS = {  # evaluation sizes and sample ladders; model + tuning budget come from experiments.PROFILES
    "smoke": dict(tasks=["piqa", "boolq"], shots=0, limit=8, calib_per_layer=True, n_boot=1000,
                  sample_ladder=[8, 16]),
    # Table 6 sources at the profile's 256 samples; Figure 7 ladder on the offline mix (each further point costs
    # about 2 min of scoring plus its tuning, so 128 and 512 are left out); ARC-Easy and PIQA (above chance), 200
    # docs, per-layer calibration (notebooks 11 and 12)
    "cpu": dict(tasks=["arc_easy", "piqa"], shots=0, limit=200, calib_per_layer=True, n_boot=2000,
                sample_ladder=[64, 256]),
    "paper": dict(tasks=list(PAPER_TASKS), shots=None, limit=None, calib_per_layer=True, n_boot=2000,
                  sample_ladder=[1000, 2000, 5000, 10000]),
}


def planned_runs(sources: list[str], train_samples: int, ladder: list[int]) -> list[tuple[str, int]]:
    """``(source, samples)`` runs: every source at ``train_samples`` (Table 6), then the offline mix at each count of
    ``ladder`` not already planned (Figure 7)."""
    planned = [(src, train_samples) for src in sources]
    return planned + [(OFFLINE_MIX, n) for n in ladder if (OFFLINE_MIX, n) not in planned]


def run(profile: str, extra_datasets=()) -> Study:
    """Tune (cached) the MindSkip router on each source and sample count, calibrate to capacity 0.5, score in one
    fidelity pass against the dense model's cached outputs (accuracy and KL, paired per document).
    ``extra_datasets``: more tuning data (local Alpaca/chat JSON(L) paths or hub ids). Writes ``all_runs`` (dense +
    one row per run), ``table6`` / ``figure7`` (its rows for Table 6 and Figure 7) and the paper's tables."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    sources = [OFFLINE_MIX, *[f"{OFFLINE_MIX}:{s}" for s in OFFLINE_SOURCES], *map(str, extra_datasets)]
    print(f"profile {profile}: model {study.model_label}; Table 6: {P['train_samples']} conversations of each of "
          f"{sources}; Figure 7: {OFFLINE_MIX} with {S['sample_ladder']} conversations; calibration "
          f"{P['calib_samples']} unlabelled task prompts; tasks {S['tasks']}, {shots_label(S)}, limit {S['limit']} "
          "docs each")
    model, tokenizer = load_base_model(P["model"])
    N = model.config.num_hidden_layers
    train_config = profile_train_config(profile)
    router_config = mindskip_config(N)  # notebook 01's attn_sequence router
    calibration = task_prompts(S["tasks"], P["calib_samples"])  # 0-shot contexts from the tasks' training splits
    reference = reference_for(model, tokenizer, S)
    sizes = {src: len(load_instruction_data(src)) for src in sources}
    planned = planned_runs(sources, P["train_samples"], S["sample_ladder"])
    runs = [(src, n) for src, n in planned if n <= sizes[src]]
    skipped = [(src, n) for src, n in planned if n > sizes[src]]
    print(f"{N} layers; routed: {router_config.resolve_layers(N)}; conversations per source: {sizes}")
    print(f"runs: {runs}" + (f"; skipped (source smaller than the sample count): {skipped}" if skipped else ""))
    tuning, thresholds, rows = {}, {}, []
    for src, n in runs:
        name = f"{src} / {n}"
        r = tuned_run(P["model"], model, tokenizer, router_config, train_config, S, calibration, data_source=src,
                      num_samples=n, reference=reference)
        tuning[name], thresholds[name] = r.record, r.thresholds
        if not rows:  # the dense reference, read from the first pass against it
            rows.append({"setting": "dense", "source": None, "samples": 0,
                         **(100 * task_means(r.results).ref_accuracy).to_dict(), **dense_row(r.results), "steps": 0,
                         "train capacity": 1.0, "tuning s": 0.0})
        cells = score_row(r.results, S["n_boot"], N)
        rows.append({"setting": name, "source": src, "samples": n, **(100 * task_means(r.results).accuracy).to_dict(),
                     **cells, "steps": r.record["steps"], "train capacity": r.record["final_capacity"],
                     "tuning s": r.record["wall_time_s"]})
        print(f"{name:28s} {r.record['steps']:3d} steps in {r.record['wall_time_s']:5.0f} s; training capacity "
              f"{r.record['final_capacity']:.2f} (threshold 0.5); eval executed {cells['executed']:.2f}; KL "
              f"{cells['kl']:.3f}")
    study.info.update(num_hidden_layers=N, skipped=skipped)
    ours = pd.DataFrame(rows)
    study.table("all_runs", ours)
    ci_width = (ours.ci_high - ours.ci_low)[1:]
    print(f"n per task: {S['limit'] or 'all'}; 95% CI width of the average difference: {ci_width.min():.1f}.."
          f"{ci_width.max():.1f} points")
    study.table("table6", ours[(ours.setting == "dense") | (ours.samples == P["train_samples"])].reset_index(drop=True))
    study.table("table6_paper_llama3_8b", pd.DataFrame([
        {"data": k, "avg (paper)": v, "diff (paper)": v - PAPER_TABLE6["baseline"]} for k, v in PAPER_TABLE6.items()]))
    fig7 = ours[(ours.setting == "dense") | (ours.source == OFFLINE_MIX)].sort_values("samples").reset_index(drop=True)
    fig7["avg (paper)"] = [PAPER_FIGURE7.get(n) for n in fig7.samples]
    study.table("figure7", fig7)
    study.table("figure7_paper_llama3_8b_instruct", pd.DataFrame([
        {"samples": k, "avg (paper)": v, "diff (paper)": v - PAPER_FIGURE7[0]} for k, v in PAPER_FIGURE7.items()]))
    study.finish(extra_datasets=list(map(str, extra_datasets)), train_config=train_config.to_dict(),
                 router_config=asdict(router_config), capacity=CAPACITY, source_sizes=sizes, runs=runs,
                 skipped_runs=skipped, tuning=tuning, thresholds=thresholds)
    return study


def plot_table6(study: Study):
    """Routed − dense per tuning source (ours with CI) beside the paper's Table 6; saves table6_diff.png."""
    table6, paper6 = study.tables["table6"], study.tables["table6_paper_llama3_8b"]
    N = study.info["num_hidden_layers"]
    g = table6[table6.setting != "dense"]
    pp = paper6[paper6.data != "baseline"]
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [len(g), len(pp)]})
    diff_bars(ax, [f"{s.replace(OFFLINE_MIX + ':', '')}\nexec {e:.2f}" for s, e in zip(g.source, g.executed)], g,
              f"ours ({study.model_label}, {study.profile})")
    ax.set_xlabel(f"tuning data ({study.profile_settings['train_samples']} conversations), executed fraction in "
                  "evaluation")
    ax.set_title(f"Ours: {', '.join(study.scored_tasks('all_runs'))} (95% paired CI)")
    axp.bar(np.arange(len(pp)), pp["diff (paper)"], 0.6, color="lightgray", edgecolor="gray",
            label="paper (Llama-3-8B)")
    baseline(axp)
    axp.set_xticks(np.arange(len(pp)), pp.data, fontsize=8)
    axp.set_xlabel("tuning data (paper)")
    axp.set_ylabel("avg accuracy − dense (points)")
    axp.set_title("Paper: HellaS/MMLU/OBQA/WinoG")
    axp.legend(fontsize=8)
    fig.suptitle(f"Table 6: attention/sequence routers, capacity {CAPACITY}, {N // 2} of {N} layers routed")
    save_figure(fig, study.out_dir, "table6_diff")
    return fig


def plot_figure7(study: Study):
    """Routed − dense against the number of tuning conversations, beside the paper's Figure 7; figure7_samples.png."""
    fig7 = study.tables["figure7"]
    r = fig7[fig7.samples > 0]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.errorbar(r.samples, r["diff"], yerr=ci_yerr(r), marker="o", capsize=4,
                label=f"ours ({study.model_label}, {study.profile}, {', '.join(study.scored_tasks('all_runs'))})")
    pk = sorted(k for k in PAPER_FIGURE7 if k > 0)
    ax.plot(pk, [PAPER_FIGURE7[k] - PAPER_FIGURE7[0] for k in pk], marker="s", color="gray", ls=":",
            label="paper (Llama-3-8B-Instruct, HellaS/MMLU/OBQA/WinoG)")
    baseline(ax, label="dense baseline (0 samples)")
    ax.set_xscale("log")
    ax.set_xlabel("tuning conversations (log scale)")
    ax.set_ylabel("avg accuracy − dense (points)")
    ax.set_title(f"Figure 7: capacity {CAPACITY}, thresholds calibrated after tuning (95% paired CI)")
    ax.legend(fontsize=8)
    save_figure(fig, study.out_dir, "figure7_samples")
    return fig


def verdict(study: Study) -> str:
    """Table 6: spread over sources and CI overlap; Figure 7: difference per sample count and its trend."""
    P, tasks = study.profile_settings, study.scored_tasks('all_runs')
    t6 = study.tables["table6"]
    t6 = t6[t6.setting != "dense"].set_index("source")
    best, worst = t6["diff"].idxmax(), t6["diff"].idxmin()
    overlap = t6.ci_low.max() <= t6.ci_high.min()
    paper_diffs = {k: v - PAPER_TABLE6["baseline"] for k, v in PAPER_TABLE6.items() if k != "baseline"}
    f7 = study.tables["figure7"]
    f7 = f7[f7.samples > 0].set_index("samples")
    trend = (np.polyfit(np.log(f7.index.values.astype(float)), f7["diff"].values, 1)[0] if len(f7) > 1
             else float("nan"))
    return "\n".join([
        f"Table 6 ({study.model_label}, {study.profile}, {P['train_samples']} conversations, tasks {tasks}): "
        "difference to dense by tuning data — " + ", ".join(f"{s} {d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for s, d, lo, hi
                                                             in zip(t6.index, t6["diff"], t6.ci_low, t6.ci_high))
        + f" points; spread {t6['diff'].max() - t6['diff'].min():.1f} points (paper, Llama-3-8B: "
        + ", ".join(f"{k} {v:+.1f}" for k, v in paper_diffs.items())
        + f"; spread {max(paper_diffs.values()) - min(paper_diffs.values()):.1f}).",
        "KL(dense || routed) by tuning data — " + ", ".join(
            f"{s} {k:.3f} [{lo:.3f}, {hi:.3f}]" for s, k, lo, hi in zip(t6.index, t6.kl, t6.kl_ci_low, t6.kl_ci_high))
        + f"; the KL CIs {'overlap' if t6.kl_ci_low.max() <= t6.kl_ci_high.min() else 'do NOT all overlap'}.",
        f"Best here (accuracy): {best}; worst: {worst}; the 95% CIs of all sources "
        f"{'overlap' if overlap else 'do NOT all overlap'}"
        + (" (robust to the data choice at this resolution, as in the paper)." if overlap
           else " (the data choice matters here).")
        + f" The mixture is {'the best' if best == OFFLINE_MIX else 'not the best'} source here (paper: the Llama-Pro "
        "mixture is best).",
        "Training-time capacity (threshold 0.5, last step) per source: "
        + ", ".join(f"{s} {c:.2f}" for s, c in t6["train capacity"].items())
        + f"; after calibration the executed fraction during evaluation is {t6.executed.min():.2f}–"
        f"{t6.executed.max():.2f} (target {CAPACITY}).",
        "Figure 7 (offline mix): difference to dense by sample count — "
        + ", ".join(f"{n}: {d:+.1f} [{lo:+.1f}, {hi:+.1f}] (train capacity {c:.2f}, eval executed {e:.2f})"
                    for n, d, lo, hi, c, e in zip(f7.index, f7["diff"], f7.ci_low, f7.ci_high, f7["train capacity"],
                                                  f7.executed))
        + "; paper (Llama-3-8B-Instruct): " + ", ".join(f"{k}: {v - PAPER_FIGURE7[0]:+.1f}" for k, v in
                                                       PAPER_FIGURE7.items() if k) + ".",
        f"Accuracy {'rises' if trend > 0 else 'does not rise'} with more tuning conversations here "
        f"({trend:+.2f} points per e-fold of samples, least squares); in the paper it rises from 1K to 5K and is flat "
        f"after. Sample counts run: {sorted(f7.index.tolist())} (plus 0 = dense); skipped: "
        f"{study.info['skipped'] or 'none'}.",
    ])
