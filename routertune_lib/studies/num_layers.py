"""Notebook 05: how many layers to route (Figures 5 and 6): accuracy against the number of routed layers, per model."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ..evaluation import PAPER_TASKS, compare, task_prompts
from ..experiments import (accuracy_table, comparison_frame, load_base_model, overall_skip, profile_train_config)
from ..paper import PAPER_FIGURE5, PAPER_FIGURE6, PAPER_MODELS
from ..plots import baseline, ci_yerr, save_figure
from .protocol import CAPACITY, Study, evaluate_setting, mindskip_config, shots_label, tuned_run

NAME = "05_num_layers"
PAPER_CURVES = {**PAPER_FIGURE5, **PAPER_FIGURE6}  # {paper model: {routed layers: average accuracy}}
SETTINGS = {  # models with their numbers of routed layers, evaluation sizes; tuning budget from experiments.PROFILES
    "smoke": dict(models={"tiny-random-smollm2-135m": [0, 2, 3], "tiny-random-gemma3-270m": [0, 2, 3]},
                  tasks=["piqa", "boolq"], shots=0, limit=8, calib_per_layer=True),
    "cpu": dict(models={"smollm2-135m": [0, 15, 24], "gemma3-270m": [0, 9, 14]},
                tasks=["piqa", "arc_challenge", "openbookqa"], shots=0, limit=120, calib_per_layer=False),
    "paper": dict(models={PAPER_MODELS[m]["hub_id"]: sorted(c) for m, c in PAPER_CURVES.items()},
                  tasks=list(PAPER_TASKS), shots=None, limit=None, calib_per_layer=True),
}


def run(profile: str) -> Study:
    """Per model and routed-layer count ``n`` (0 = dense): tune (cached), calibrate to capacity 0.5, evaluate.
    Writes ``num_layers`` (one row per model x n), ``num_layers_paper`` (the paper's curves) and ``half_vs_max``
    (one row per model: the point nearest half against the most-routed point)."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    if not all(0 in counts for counts in S["models"].values()):
        raise ValueError(f"every model needs n = 0 (its dense baseline): {S['models']}")
    train_config = profile_train_config(profile)
    calibration = task_prompts(S["tasks"], P["calib_samples"])  # 0-shot contexts from the tasks' training splits
    print(f"profile {profile}: models and routed-layer counts {S['models']}; tuning {P['train_samples']} "
          f"conversations (max_length {P['max_length']}, lr {P['lr']}); calibration {len(calibration)} unlabelled "
          f"task prompts ({'per layer' if S['calib_per_layer'] else 'one global threshold'}); tasks {S['tasks']}, "
          f"{shots_label(S)}, limit {S['limit']} docs each")
    results, tuning, layers = {}, {}, {}
    for name, counts in S["models"].items():
        model, tokenizer = load_base_model(name)
        N = layers[name] = model.config.num_hidden_layers
        results[name] = {0: evaluate_setting(model, tokenizer, S)}
        avg = lambda e: 100 * sum(t.score for t in e.tasks.values()) / len(S["tasks"])
        for n in sorted(c for c in counts if c > 0):
            rc = mindskip_config(N, num_layers=n)
            r = tuned_run(name, model, tokenizer, rc, train_config, S, calibration, num_samples=P["train_samples"])
            tuning[name, n], results[name][n] = r.record, r.results
            print(f"{name} ({N} layers), n={n:2d} routed {rc.resolve_layers(N)[0]}..{rc.resolve_layers(N)[-1]}: "
                  f"tuned in {r.record['wall_time_s']:.0f} s (training capacity {r.record['final_capacity']:.2f}); "
                  f"eval executed {r.results.routing['overall']:.2f}, avg {avg(r.results):.1f}% "
                  f"(dense {avg(results[name][0]):.1f}%)")
        del model
    study.info["layers"] = layers
    ours = study.table("num_layers", _curves(results, tuning, layers))
    study.table("num_layers_paper", pd.DataFrame([
        {"model": m, "layers": PAPER_MODELS[m]["num_layers"], "n": n,
         "fraction routed": n / PAPER_MODELS[m]["num_layers"], "avg": v, "diff": v - curve[0],
         "figure": 5 if m in PAPER_FIGURE5 else 6}
        for m, curve in PAPER_CURVES.items() for n, v in sorted(curve.items())]))
    w = (ours.ci_high - ours.ci_low)[ours.n > 0]
    print(f"n per task {results[next(iter(results))][0].tasks[S['tasks'][0]].n}; 95% CI width of the average "
          f"difference {w.min():.1f}..{w.max():.1f} points")
    study.table("half_vs_max", _half_vs_max(ours, results, layers))
    study.finish(train_config=train_config.to_dict(), capacity=CAPACITY, layers=layers,
                 tuning={f"{m}/n={n}": v for (m, n), v in tuning.items()})
    return study


def _curves(results: dict, tuning: dict, layers: dict) -> pd.DataFrame:
    ours = []
    for name, by_n in results.items():
        t = accuracy_table(by_n, baseline=0).rename(columns={"setting": "n"})
        t.insert(0, "model", name)
        t.insert(1, "layers", layers[name])
        t.insert(3, "fraction routed", t.n / layers[name])
        t["skipped share"] = [overall_skip(by_n[n], layers[name]) for n in t.n]
        t["tuning s"] = [tuning[name, n]["wall_time_s"] if n else 0.0 for n in t.n]
        ours.append(t)
    return pd.concat(ours, ignore_index=True)


def _half_vs_max(ours: pd.DataFrame, results: dict, layers: dict) -> pd.DataFrame:
    """Per model: the point nearest half routed and the most-routed point vs dense, and their paired difference."""
    claim = []
    for name, g in ours.groupby("model", sort=False):
        routed = g[g.n > 0]
        half = int(routed.loc[(routed["fraction routed"] - 0.5).abs().idxmin(), "n"])
        top = int(routed.n.max())
        fall = (comparison_frame(compare(results[name][half], results[name][top])).set_index("task").loc["average"]
                if top > half else pd.Series({"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}))
        h, t = g.set_index("n").loc[half], g.set_index("n").loc[top]
        claim.append({"model": name, "layers": layers[name], "n half": half, "diff half": h["diff"],
                      "ci_low half": h.ci_low, "ci_high half": h.ci_high, "n max": top, "diff max": t["diff"],
                      "ci_low max": t.ci_low, "ci_high max": t.ci_high, "max − half": fall["diff"],
                      "ci_low max − half": fall.ci_low, "ci_high max − half": fall.ci_high})
    return pd.DataFrame(claim)


def plot(study: Study):
    """Left: accuracy vs fraction of layers routed per model (dense dashed); right: the difference to dense beside
    the paper's curves. Saves figure5_6.png."""
    ours, paper, layers = study.tables["num_layers"], study.tables["num_layers_paper"], study.info["layers"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, g), marker in zip(ours.groupby("model", sort=False), "osD^v"):
        line = a.errorbar(g["fraction routed"], g.avg, yerr=ci_yerr(g), marker=marker, capsize=3,
                          label=f"{name} ({layers[name]} layers)")
        a.axhline(g.avg.iloc[0], color=line[0].get_color(), ls="--", lw=1)
        for _, r in g[g.n > 0].iterrows():
            a.annotate(f"n={r.n}", (r["fraction routed"], r.avg), textcoords="offset points", xytext=(4, 4),
                       fontsize=7)
        b.errorbar(g["fraction routed"], g["diff"], yerr=ci_yerr(g), marker=marker, capsize=3, label=f"ours: {name}")
    for (name, g), marker in zip(paper.groupby("model", sort=False), "osD^v"):
        b.plot(g["fraction routed"], g["diff"], marker=marker, ls=":", color="gray", alpha=0.8, ms=4,
               label=f"paper: {name} (Fig. {g.figure.iloc[0]})")
    a.set_xlabel("fraction of layers routed (n / N)")
    a.set_ylabel(f"average accuracy (%), {len(study.settings['tasks'])} tasks")
    a.set_title(f"Ours ({study.profile}); dashed: dense; error bars: paired 95% CI vs dense", fontsize=9)
    a.legend(fontsize=8)
    baseline(b)
    b.axvline(0.5, color="gray", lw=0.5)
    b.set_xlabel("fraction of layers routed (n / N)")
    b.set_ylabel("average accuracy − dense (points)")
    b.set_title("Shape: ours vs the paper's Figures 5-6 (capacity 0.5, attention, sequence)", fontsize=9)
    b.legend(fontsize=7)
    save_figure(fig, study.out_dir, "figure5_6")
    return fig


def _versus_dense(lo: float, hi: float) -> str:
    return ("not distinguishable from dense" if lo <= 0 <= hi
            else "significantly below dense" if hi < 0 else "significantly above dense")


def verdict(study: Study) -> str:
    """Per model: near half vs dense, most routed vs dense, and the paired change between them; the paper's."""
    lines = []
    for _, c in study.tables["half_vs_max"].iterrows():
        N = c.layers
        lines.append(
            f"{c.model} ({N} layers): n={c['n half']} ({c['n half'] / N:.0%}) routed: {c['diff half']:+.1f} "
            f"[{c['ci_low half']:+.1f}, {c['ci_high half']:+.1f}] points "
            f"({_versus_dense(c['ci_low half'], c['ci_high half'])}); "
            f"n={c['n max']} ({c['n max'] / N:.0%}): {c['diff max']:+.1f} [{c['ci_low max']:+.1f}, "
            f"{c['ci_high max']:+.1f}] ({_versus_dense(c['ci_low max'], c['ci_high max'])}). "
            + ("No point beyond half was measured." if c['n max'] == c['n half'] else
               f"From n={c['n half']} to n={c['n max']} the accuracy changes by {c['max − half']:+.1f} "
               f"[{c['ci_low max − half']:+.1f}, {c['ci_high max − half']:+.1f}] points (paired 95% CI: "
               + ("a significant fall" if c['ci_high max − half'] < 0 else "a significant rise"
                  if c['ci_low max − half'] > 0 else "no significant change") + ")."))
    for name, g in study.tables["num_layers_paper"].groupby("model", sort=False):
        routed = g[g.n > 0]
        h = routed.loc[(routed["fraction routed"] - 0.5).abs().idxmin()]
        t = routed.loc[routed.n.idxmax()]
        lines.append(f"paper {name} ({h.layers} layers): n={h.n} ({h['fraction routed']:.0%}) {h['diff']:+.1f}; "
                     f"n={t.n} ({t['fraction routed']:.0%}) {t['diff']:+.1f} points.")
    return "\n".join(lines)
