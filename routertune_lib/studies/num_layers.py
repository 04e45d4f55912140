"""Notebook 05: how many layers to route (Figures 5 and 6): accuracy against the number of routed layers, per model."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ..evaluation import PAPER_TASKS, task_prompts
from ..experiments import load_base_model, profile_train_config
from ..paper import PAPER_FIGURE5, PAPER_FIGURE6, PAPER_MODELS
from ..plots import baseline, ci_yerr, save_figure
from .protocol import (CAPACITY, Study, dense_row, mindskip_config, paired_rows, reference_for, score_row, shots_label,
                       tuned_run)

NAME = "05_num_layers"
PAPER_CURVES = {**PAPER_FIGURE5, **PAPER_FIGURE6}  # {paper model: {routed layers: average accuracy}}
SETTINGS = {  # models with their numbers of routed layers, evaluation sizes; tuning budget from experiments.PROFILES
    "smoke": dict(models={"tiny-random-smollm2-135m": [0, 2, 3], "tiny-random-gemma3-270m": [0, 2, 3]},
                  tasks=["piqa", "boolq"], shots=0, limit=8, calib_per_layer=True, n_boot=1000),
    # cpu: ARC-Easy and PIQA 0-shot (above chance), 200 docs, per-layer calibration (notebooks 11 and 12)
    "cpu": dict(models={"smollm2-135m": [0, 15, 24], "gemma3-270m": [0, 9, 14]},
                tasks=["arc_easy", "piqa"], shots=0, limit=200, calib_per_layer=True, n_boot=2000),
    "paper": dict(models={PAPER_MODELS[m]["hub_id"]: sorted(c) for m, c in PAPER_CURVES.items()},
                  tasks=list(PAPER_TASKS), shots=None, limit=None, calib_per_layer=True, n_boot=2000),
}


def run(profile: str) -> Study:
    """Per model and routed-layer count ``n`` (0 = dense): tune (cached), calibrate to capacity 0.5, score in one
    fidelity pass against the dense model's cached outputs (accuracy and KL, paired per document). Writes
    ``num_layers`` (one row per model x n), ``num_layers_paper`` (the paper's curves) and ``half_vs_max`` (per model
    and metric: the most-routed point minus the point nearest half, paired)."""
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
        reference, results[name] = reference_for(model, tokenizer, S), {}
        for n in sorted(c for c in counts if c > 0):
            rc = mindskip_config(N, num_layers=n)
            r = tuned_run(name, model, tokenizer, rc, train_config, S, calibration, num_samples=P["train_samples"],
                          reference=reference)
            tuning[name, n], results[name][n] = r.record, r.results
            cells, dense = score_row(r.results, S["n_boot"], N), dense_row(r.results)
            print(f"{name} ({N} layers), n={n:2d} routed {rc.resolve_layers(N)[0]}..{rc.resolve_layers(N)[-1]}: "
                  f"tuned in {r.record['wall_time_s']:.0f} s (training capacity {r.record['final_capacity']:.2f}); "
                  f"eval executed {cells['executed']:.2f}, avg {cells['avg']:.1f}% (dense {dense['avg']:.1f}%), "
                  f"KL {cells['kl']:.3f}")
        del model
    study.info["layers"] = layers
    ours = study.table("num_layers", _curves(results, tuning, layers, S["n_boot"]))
    study.table("num_layers_paper", pd.DataFrame([
        {"model": m, "layers": PAPER_MODELS[m]["num_layers"], "n": n,
         "fraction routed": n / PAPER_MODELS[m]["num_layers"], "avg": v, "diff": v - curve[0],
         "figure": 5 if m in PAPER_FIGURE5 else 6}
        for m, curve in PAPER_CURVES.items() for n, v in sorted(curve.items())]))
    w = (ours.ci_high - ours.ci_low)[ours.n > 0]
    print(f"n per task {S['limit'] or 'all'}; 95% CI width of the average difference {w.min():.1f}..{w.max():.1f} "
          "points")
    study.table("half_vs_max", _half_vs_max(ours, results, layers, S["n_boot"]))
    study.finish(train_config=train_config.to_dict(), capacity=CAPACITY, layers=layers,
                 tuning={f"{m}/n={n}": v for (m, n), v in tuning.items()})
    return study


def _curves(results: dict, tuning: dict, layers: dict, n_boot: int) -> pd.DataFrame:
    """One row per model and n (0: the dense reference): :func:`protocol.score_row` cells (average accuracy, its
    paired difference to dense, KL to dense, agreement, executed and skipped shares) and the tuning time."""
    rows = []
    for name, by_n in results.items():
        N, some = layers[name], next(iter(by_n.values()))
        for n, fid in [(0, None), *by_n.items()]:
            cells = dense_row(some) if fid is None else score_row(fid, n_boot, N)
            rows.append({"model": name, "layers": N, "n": n, "fraction routed": n / N, **cells,
                         "tuning s": tuning[name, n]["wall_time_s"] if n else 0.0})
    return pd.DataFrame(rows)


def _half_vs_max(ours: pd.DataFrame, results: dict, layers: dict, n_boot: int) -> pd.DataFrame:
    """Per model: the point nearest half routed and the most-routed point vs dense, and their paired difference
    (most routed minus half; averaged over tasks) in accuracy (points) and KL (nats)."""
    claim = []
    for name, g in ours.groupby("model", sort=False):
        routed = g[g.n > 0]
        half = int(routed.loc[(routed["fraction routed"] - 0.5).abs().idxmin(), "n"])
        top = int(routed.n.max())
        h, t = g.set_index("n").loc[half], g.set_index("n").loc[top]
        row = {"model": name, "layers": layers[name], "n half": half, "diff half": h["diff"],
               "ci_low half": h.ci_low, "ci_high half": h.ci_high, "kl half": h.kl, "n max": top,
               "diff max": t["diff"], "ci_low max": t.ci_low, "ci_high max": t.ci_high, "kl max": t.kl}
        nan = float("nan")
        fall = ({r["metric"]: r for r in paired_rows(results[name][top], results[name][half], n_boot)
                 if r["task"] == "average"} if top > half else {})
        for metric, prefix in (("accuracy", ""), ("kl", "kl ")):
            r = fall.get(metric, {})
            row.update({f"{prefix}max − half": r.get("diff", nan), f"{prefix}ci_low max − half": r.get("ci_low", nan),
                        f"{prefix}ci_high max − half": r.get("ci_high", nan)})
        claim.append(row)
    return pd.DataFrame(claim)


def plot(study: Study):
    """Left: accuracy vs fraction of layers routed per model (dense dashed); middle: the difference to dense beside
    the paper's curves; right: KL(dense || routed) with its 95% CI. Saves figure5_6.png."""
    ours, paper, layers = study.tables["num_layers"], study.tables["num_layers_paper"], study.info["layers"]
    fig, (a, b, k) = plt.subplots(1, 3, figsize=(17, 4.5))
    for (name, g), marker in zip(ours.groupby("model", sort=False), "osD^v"):
        line = a.errorbar(g["fraction routed"], g.avg, yerr=ci_yerr(g), marker=marker, capsize=3,
                          label=f"{name} ({layers[name]} layers)")
        a.axhline(g.avg.iloc[0], color=line[0].get_color(), ls="--", lw=1)
        for _, r in g[g.n > 0].iterrows():
            a.annotate(f"n={r.n}", (r["fraction routed"], r.avg), textcoords="offset points", xytext=(4, 4),
                       fontsize=7)
        b.errorbar(g["fraction routed"], g["diff"], yerr=ci_yerr(g), marker=marker, capsize=3, label=f"ours: {name}")
        k.errorbar(g["fraction routed"], g.kl, yerr=[g.kl - g.kl_ci_low, g.kl_ci_high - g.kl], marker=marker,
                   capsize=3, label=name)
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
    k.set_xlabel("fraction of layers routed (n / N)")
    k.set_ylabel("KL(dense || routed), nats / token")
    k.set_title("Fidelity to dense (mean per document, 95% CI)", fontsize=9)
    k.legend(fontsize=8)
    fig.tight_layout()
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
                  if c['ci_low max − half'] > 0 else "no significant change") + f"), the KL to dense by "
               f"{c['kl max − half']:+.3f} [{c['kl ci_low max − half']:+.3f}, {c['kl ci_high max − half']:+.3f}] "
               f"(from {c['kl half']:.3f} to {c['kl max']:.3f})."))
    for name, g in study.tables["num_layers_paper"].groupby("model", sort=False):
        routed = g[g.n > 0]
        h = routed.loc[(routed["fraction routed"] - 0.5).abs().idxmin()]
        t = routed.loc[routed.n.idxmax()]
        lines.append(f"paper {name} ({h.layers} layers): n={h.n} ({h['fraction routed']:.0%}) {h['diff']:+.1f}; "
                     f"n={t.n} ({t['fraction routed']:.0%}) {t['diff']:+.1f} points.")
    return "\n".join(lines)
