"""Notebook 06: the same MindSkip recipe across model families and sizes (Table 5)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..evaluation import PAPER_TASKS, task_average, task_prompts
from ..experiments import load_base_model, profile_train_config, speedup_cells
from ..paper import PAPER_MODELS, PAPER_TABLE5
from ..plots import baseline, ci_yerr, save_figure
from .protocol import (CAPACITY, Study, dense_row, mindskip_config, reference_for, resolved, score_row, shots_label,
                       task_means, timing_pool, tuned_run)

NAME = "06_across_models"
SETTINGS = {  # models, evaluation and timing sizes; tuning budget from experiments.PROFILES (shared by notebooks)
    "smoke": dict(models=["tiny-random-smollm2-135m", "tiny-random-gemma3-270m"], tasks=["piqa", "boolq"], shots=0,
                  limit=8, calib_per_layer=True, n_boot=1000,
                  speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    # cpu: ARC-Easy and PIQA 0-shot (SmolLM2-135M is clearly above chance there, results/task_selection), 200 docs,
    # per-layer calibration (notebooks 11 and 12); timing 5 interleaved rounds of batch 8 x 256 tokens, 32 new
    "cpu": dict(models=["smollm2-135m", "gemma3-270m"], tasks=["arc_easy", "piqa"], shots=0, limit=200,
                calib_per_layer=True, n_boot=2000,
                speed=dict(batch_size=8, prompt_len=256, num_prompts=8, new_tokens=32, repeats=5)),
    "paper": dict(models=[PAPER_MODELS[m]["hub_id"] for m in PAPER_TABLE5], tasks=list(PAPER_TASKS), shots=None,
                  limit=None, calib_per_layer=True, n_boot=2000,
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=128, repeats=5)),
}
PAPER_NAME = {v["hub_id"]: k for k, v in PAPER_MODELS.items()}  # hub id -> the paper's model name


def run(profile: str) -> Study:
    """Per model: half the layers' attention routed (cached), calibrated to capacity 0.5, scored in one fidelity
    pass against the dense model's cached outputs (accuracy and KL, paired per document) and timed. Writes
    ``table5`` (one row per model), ``table5_tasks`` (per task and model) and ``table5_paper``."""
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
        reference = reference_for(model, tokenizer, S)
        pool = timing_pool(tokenizer, S["tasks"], S["speed"])
        r = tuned_run(name, model, tokenizer, mindskip_config(N), train_config, S, calibration,
                      num_samples=P["train_samples"], timing_pool=pool, reference=reference)
        tuning[name], speed[name] = r.record, r.speed
        cells, paper = score_row(r.results, S["n_boot"], N), PAPER_TABLE5.get(PAPER_NAME.get(name), {})
        rows.append({"model": name, "layers": N, "routed layers": N // 2, "dense": dense_row(r.results)["avg"],
                     "routed": cells["avg"], **{k: v for k, v in cells.items() if k != "avg"},
                     **speedup_cells(r.speed), "flop_fraction": r.speed.flop_fraction, "kv ratio": r.speed.kv_ratio,
                     "skipped share (timing)": r.speed.skipped_share, "tuning s": r.record["wall_time_s"],
                     "dense (paper)": paper.get("dense"), "routed (paper)": paper.get("routed"),
                     "speedup (paper)": paper.get("speedup")})
        per_task.append(_per_task(r.results, name, S["n_boot"]))
        print(f"{name} ({N} layers, {N // 2} routed): tuned in {r.record['wall_time_s']:.0f} s; avg "
              f"{rows[-1]['dense']:.1f}% -> {cells['avg']:.1f}% (executed {cells['executed']:.2f}); KL "
              f"{cells['kl']:.3f}; speed-up {r.speed.speedup:.2f}x, KV cache {r.speed.kv_ratio:.2f} of dense")
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


def _per_task(fid, model: str, n_boot: int) -> pd.DataFrame:
    """Per task of one model's fidelity pass: dense and routed accuracy (%), their paired difference (points) and
    the KL(dense || routed) per document, each with its 95% CI, and the answer agreement (%)."""
    docs = fid.choice_frame()
    acc = task_average(docs.assign(d=100 * (docs.accuracy - docs.ref_accuracy)), "d", n_boot)["tasks"]
    kl = task_average(docs, "kl", n_boot)["tasks"]
    means = task_means(fid)
    return pd.DataFrame([{"model": model, "task": t, "n": acc[t]["n"], "dense": 100 * m.ref_accuracy,
                          "routed": 100 * m.accuracy, "diff": acc[t]["value"], "ci_low": acc[t]["ci_low"],
                          "ci_high": acc[t]["ci_high"], "kl": kl[t]["value"], "kl_ci_low": kl[t]["ci_low"],
                          "kl_ci_high": kl[t]["ci_high"], "agreement": 100 * m.agreement}
                         for t, m in means.iterrows()])


def plot(study: Study):
    """Left: routed − dense accuracy per model (ours with its paired CI, the paper's); middle: KL(dense || routed)
    per model with its CI; right: end-to-end speed-up with its CI (labels: FLOP fraction, KV ratio), the paper's
    beside. Saves table5.png."""
    table, paper_table = study.tables["table5"], study.tables["table5_paper"]
    fig, (a, k, b) = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [2, 1, 2]})
    x_ours, x_paper = np.arange(len(table)), len(table) + 0.5 + np.arange(len(paper_table))
    labels = [f"{m}\n(ours)" for m in table.model] + [f"{m}\n(paper)" for m in paper_table.model]
    a.bar(x_ours, table["diff"], 0.6, yerr=ci_yerr(table), capsize=4,
          label=f"ours ({study.profile}, {len(study.settings['tasks'])} tasks, 95% paired CI)")
    a.bar(x_paper, paper_table["diff"], 0.6, color="lightgray", edgecolor="gray", label="paper (8 tasks)")
    baseline(a)
    a.set_ylabel("avg accuracy, routed − dense (points)")
    a.set_title(f"Half the layers routed, capacity {CAPACITY}, attention / sequence", fontsize=9)
    k.bar(x_ours, table.kl, 0.6, yerr=[table.kl - table.kl_ci_low, table.kl_ci_high - table.kl], capsize=4)
    k.set_xticks(x_ours, table.model, fontsize=7, rotation=30, ha="right")
    k.set_ylabel("KL(dense || routed), nats / token")
    k.set_title("Fidelity to dense (mean per document, 95% CI)", fontsize=9)
    b.bar(x_ours, table.speedup, 0.6, yerr=[table.speedup - table["speedup ci_low"],
                                            table["speedup ci_high"] - table.speedup], capsize=4,
          label="ours: measured end-to-end speed-up (95% CI)")
    b.bar(x_paper, paper_table.speedup, 0.6, color="lightgray", edgecolor="gray", label="paper (GPU)")
    for x, s, f, kv in zip(x_ours, table["speedup ci_high"], table.flop_fraction, table["kv ratio"]):
        b.annotate(f"FLOPs {f:.2f}\nKV {kv:.2f}", (x, s), textcoords="offset points", xytext=(0, 3), ha="center",
                   fontsize=7)
    baseline(b, 1.0, "dense (1.0x)")
    b.set_ylabel("generation speed-up over dense (x)")
    b.set_title("End-to-end speed-up (ours: real skipping, this machine)", fontsize=9)
    for ax in (a, b):
        ax.set_xticks(np.r_[x_ours, x_paper], labels, fontsize=7, rotation=30, ha="right")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, study.out_dir, "table5")
    return fig


def verdict(study: Study) -> str:
    """Per model: routed vs dense (paired CIs of accuracy and KL), skipping and speed-up (with its CI); the ranges
    beside the paper's."""
    table, paper_table = study.tables["table5"], study.tables["table5_paper"]
    versus = lambda r: "significantly different from" if resolved(r.ci_low, r.ci_high) else "not distinguishable from"
    faster = lambda r: ("faster than" if r["speedup ci_low"] > 1 else "slower than" if r["speedup ci_high"] < 1
                        else "not distinguishable from")
    lines = [f"{r.model}: {r.dense:.1f}% -> {r.routed:.1f}% ({r['diff']:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}] "
             f"points, {versus(r)} dense at 95%); KL to dense {r.kl:.3f} [{r.kl_ci_low:.3f}, {r.kl_ci_high:.3f}]; "
             f"executed {r.executed:.2f} of routed-layer inputs ({r['skipped share']:.0%} of all attention "
             f"executions skipped); {r.speedup:.2f}x [{r['speedup ci_low']:.2f}, {r['speedup ci_high']:.2f}] "
             f"end-to-end ({faster(r)} dense; FLOP fraction {r.flop_fraction:.3f}, {r['skipped share (timing)']:.0%} "
             f"skipped while timed), KV cache {r['kv ratio']:.2f} of dense." for _, r in table.iterrows()]
    lines.append(f"Paper (GPU, 8 tasks): differences {paper_table['diff'].min():+.1f}.."
                 f"{paper_table['diff'].max():+.1f} points, speed-ups {paper_table.speedup.min():.2f}-"
                 f"{paper_table.speedup.max():.2f}x. Ours: "
                 f"differences {table['diff'].min():+.1f}..{table['diff'].max():+.1f} points, speed-ups "
                 f"{table.speedup.min():.2f}-{table.speedup.max():.2f}x; "
                 f"{int(((table.ci_low <= 0) & (0 <= table.ci_high)).sum())} of {len(table)} models within the 95% CI "
                 f"of dense in accuracy, {int((table['speedup ci_low'] > 1).sum())} of {len(table)} resolved faster "
                 "than dense.")
    return "\n".join(lines)
