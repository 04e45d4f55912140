"""Notebook 06: the same MindSkip recipe across model families and sizes (Table 5)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..evaluation import PAPER_TASKS, compare, task_prompts
from ..experiments import (accuracy_table, comparison_frame, load_base_model, overall_skip, profile_train_config,
                           speedup_cells)
from ..paper import PAPER_MODELS, PAPER_TABLE5
from ..plots import baseline, ci_yerr, save_figure
from .protocol import (CAPACITY, Study, evaluate_setting, mindskip_config, resolved, shots_label, timing_pool,
                       tuned_run)

NAME = "06_across_models"
SETTINGS = {  # models, evaluation and timing sizes; tuning budget from experiments.PROFILES (shared by notebooks)
    "smoke": dict(models=["tiny-random-smollm2-135m", "tiny-random-gemma3-270m"], tasks=["piqa", "boolq"], shots=0,
                  limit=8, calib_per_layer=True,
                  speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    "cpu": dict(models=["smollm2-135m", "gemma3-270m"], tasks=["piqa", "arc_challenge", "openbookqa"], shots=0,
                limit=120, calib_per_layer=False,
                speed=dict(batch_size=4, prompt_len=128, num_prompts=4, new_tokens=16, repeats=2)),
    "paper": dict(models=[PAPER_MODELS[m]["hub_id"] for m in PAPER_TABLE5], tasks=list(PAPER_TASKS), shots=None,
                  limit=None, calib_per_layer=True,
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=128, repeats=3)),
}
PAPER_NAME = {v["hub_id"]: k for k, v in PAPER_MODELS.items()}  # hub id -> the paper's model name


def run(profile: str) -> Study:
    """Per model: dense, half the layers' attention routed (cached), calibrated to capacity 0.5, evaluated and
    timed. Writes ``table5`` (one row per model), ``table5_tasks`` (per task and model) and ``table5_paper``."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    train_config = profile_train_config(profile)
    calibration = task_prompts(S["tasks"], P["calib_samples"])  # 0-shot contexts, the tasks' training splits
    print(f"profile {profile}: models {S['models']}; tuning {P['train_samples']} conversations (max_length "
          f"{P['max_length']}, lr {P['lr']}); calibration {len(calibration)} unlabelled task prompts "
          f"({'per layer' if S['calib_per_layer'] else 'one global threshold'}); tasks {S['tasks']}, "
          f"{shots_label(S)}, limit {S['limit']} docs each; speed {S['speed']}")
    rows, per_task, tuning, speed = [], [], {}, {}
    for name in S["models"]:
        model, tokenizer = load_base_model(name)
        N = model.config.num_hidden_layers
        dense = evaluate_setting(model, tokenizer, S)
        pool = timing_pool(tokenizer, S["tasks"], S["speed"])
        r = tuned_run(name, model, tokenizer, mindskip_config(N), train_config, S, calibration,
                      num_samples=P["train_samples"], timing_pool=pool)
        tuning[name], speed[name] = r.record, r.speed
        acc = accuracy_table({"dense": dense, "routed": r.results}, baseline="dense").set_index("setting")
        paper = PAPER_TABLE5.get(PAPER_NAME.get(name), {})
        rows.append({"model": name, "layers": N, "routed layers": N // 2, "dense": acc.avg["dense"],
                     "routed": acc.avg["routed"], "diff": acc["diff"]["routed"], "ci_low": acc.ci_low["routed"],
                     "ci_high": acc.ci_high["routed"], "executed": acc.executed["routed"],
                     "skipped share": overall_skip(r.results, N), **speedup_cells(r.speed),
                     "kv ratio": r.speed.kv_ratio, "skipped share (timing)": r.speed.skipped_share,
                     "tuning s": r.record["wall_time_s"], "dense (paper)": paper.get("dense"),
                     "routed (paper)": paper.get("routed"), "speedup (paper)": paper.get("speedup")})
        per_task.append(comparison_frame(compare(dense, r.results)).assign(model=name))
        print(f"{name} ({N} layers, {N // 2} routed): tuned in {r.record['wall_time_s']:.0f} s; avg "
              f"{acc.avg['dense']:.1f}% -> {acc.avg['routed']:.1f}% (executed {acc.executed['routed']:.2f}); "
              f"speed-up {r.speed.speedup:.2f}x, KV cache {r.speed.kv_ratio:.2f} of dense")
        del model
    table = study.table("table5", pd.DataFrame(rows))
    study.table("table5_tasks", pd.concat(per_task, ignore_index=True))
    paper_table = study.table("table5_paper", pd.DataFrame([
        {"model": m, "layers": PAPER_MODELS[m]["num_layers"], **v, "diff": v["routed"] - v["dense"]}
        for m, v in PAPER_TABLE5.items()]))
    w = table.ci_high - table.ci_low
    print(f"n per task {S['limit'] or 'all'}; 95% CI width of the average difference {w.min():.1f}..{w.max():.1f} "
          "points")
    print("paper (Table 5, 8 tasks, GPU):\n" + paper_table.to_string(index=False))
    study.finish(train_config=train_config.to_dict(), capacity=CAPACITY, tuning=tuning,
                 speed={k: v.to_dict() for k, v in speed.items()})
    return study


def plot(study: Study):
    """Left: routed − dense accuracy per model (ours with CI, the paper's); right: speed-up and KV ratio.
    Saves table5.png."""
    table, paper_table = study.tables["table5"], study.tables["table5_paper"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    x_ours, x_paper = np.arange(len(table)), len(table) + 0.5 + np.arange(len(paper_table))
    labels = [f"{m}\n(ours)" for m in table.model] + [f"{m}\n(paper)" for m in paper_table.model]
    a.bar(x_ours, table["diff"], 0.6, yerr=ci_yerr(table), capsize=4,
          label=f"ours ({study.profile}, {len(study.settings['tasks'])} tasks, 95% paired CI)")
    a.bar(x_paper, paper_table["diff"], 0.6, color="lightgray", edgecolor="gray", label="paper (8 tasks)")
    baseline(a)
    a.set_ylabel("avg accuracy, routed − dense (points)")
    a.set_title(f"Half the layers routed, capacity {CAPACITY}, attention / sequence", fontsize=9)
    b.bar(x_ours, table.speedup, 0.6, label="ours: measured end-to-end speed-up")
    b.bar(x_paper, paper_table.speedup, 0.6, color="lightgray", edgecolor="gray", label="paper (GPU)")
    for x, s, kv in zip(x_ours, table.speedup, table["kv ratio"]):
        b.annotate(f"KV {kv:.2f}", (x, s), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    baseline(b, 1.0, "dense (1.0x)")
    b.set_ylabel("generation speed-up over dense (x)")
    b.set_title("End-to-end speed-up (ours: real skipping, this machine; KV: cache ratio)", fontsize=9)
    for ax in (a, b):
        ax.set_xticks(np.r_[x_ours, x_paper], labels, fontsize=7, rotation=30, ha="right")
        ax.legend(fontsize=8)
    save_figure(fig, study.out_dir, "table5")
    return fig


def verdict(study: Study) -> str:
    """Per model: routed vs dense (paired CI), skipping and speed-up; the ranges beside the paper's."""
    table, paper_table = study.tables["table5"], study.tables["table5_paper"]
    versus = lambda r: "significantly different from" if resolved(r.ci_low, r.ci_high) else "not distinguishable from"
    lines = [f"{r.model}: {r.dense:.1f}% -> {r.routed:.1f}% ({r['diff']:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}] "
             f"points, {versus(r)} dense at 95%); executed {r.executed:.2f} of routed-layer inputs "
             f"({r['skipped share']:.0%} of all attention executions skipped); {r.speedup:.2f}x end-to-end "
             f"({r['skipped share (timing)']:.0%} skipped while timed), KV cache {r['kv ratio']:.2f} of dense."
             for _, r in table.iterrows()]
    lines.append(f"Paper (GPU, 8 tasks): differences {paper_table['diff'].min():+.1f}.."
                 f"{paper_table['diff'].max():+.1f} points, speed-ups {paper_table.speedup.min():.2f}-"
                 f"{paper_table.speedup.max():.2f}x. Ours: "
                 f"differences {table['diff'].min():+.1f}..{table['diff'].max():+.1f} points, speed-ups "
                 f"{table.speedup.min():.2f}-{table.speedup.max():.2f}x; "
                 f"{int(((table.ci_low <= 0) & (0 <= table.ci_high)).sum())} of {len(table)} models within the 95% CI "
                 f"of dense, {int((table.speedup > 1).sum())} of {len(table)} faster than dense.")
    return "\n".join(lines)
