"""Notebook 01: what to route (attention / MLP / block) and per what (token / sequence), Table 2."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..evaluation import PAPER_TASKS, task_prompts
from ..experiments import (accuracy_table, load_base_model, overall_skip, paper_tasks_mean, profile_train_config,
                           speedup_cells)
from ..paper import PAPER_TABLE2
from ..plots import diff_bars, save_figure
from ..routing import RouterConfig
from .protocol import CAPACITY, Study, evaluate_setting, mindskip_config, shots_label, timing_pool, tuned_run

NAME = "01_granularity"
SETTINGS = {  # evaluation and timing sizes; model + tuning budget come from experiments.PROFILES (shared by notebooks)
    "smoke": dict(tasks=["piqa", "boolq"], shots=0, limit=8, calib_per_layer=True,
                  speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    "cpu": dict(tasks=["piqa", "arc_challenge", "openbookqa"], shots=0, limit=120, calib_per_layer=False,
                speed=dict(batch_size=4, prompt_len=128, num_prompts=4, new_tokens=16, repeats=2)),
    "paper": dict(tasks=list(PAPER_TASKS), shots=None, limit=None, calib_per_layer=True,
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=128, repeats=3)),
}
GRANULARITIES = [(t, l) for t in ("block", "mlp", "attn") for l in ("token", "sequence")]  # Table 2's row order


def run(profile: str) -> Study:
    """Tune (cached), calibrate to capacity 0.5, evaluate and time each granularity; writes ``table2`` (dense + six
    granularities, ours beside the paper's) and ``table2_paper_llama3_8b``."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    print(f"profile {profile}: model {study.model_label}; tuning {P['train_samples']} conversations "
          f"(max_length {P['max_length']}, lr {P['lr']}); calibration {P['calib_samples']} unlabelled task prompts "
          f"({'per layer' if S['calib_per_layer'] else 'one global threshold'}); tasks {S['tasks']}, "
          f"{shots_label(S)}, limit {S['limit']} docs each; speed {S['speed']}")
    model, tokenizer = load_base_model(P["model"])
    N = model.config.num_hidden_layers
    train_config = profile_train_config(profile)
    calibration = task_prompts(S["tasks"], P["calib_samples"])  # 0-shot contexts from the tasks' training splits
    pool = timing_pool(tokenizer, S["tasks"], S["speed"])
    results = {"dense": evaluate_setting(model, tokenizer, S)}
    print(f"{N} layers; routed: {RouterConfig(num_layers=N // 2).resolve_layers(N)}")
    runs = {}
    for target, level in GRANULARITIES:
        name = f"{target}_{level}"
        r = runs[name] = tuned_run(P["model"], model, tokenizer, mindskip_config(N, target=target, level=level),
                                   train_config, S, calibration, num_samples=P["train_samples"],
                                   timing_pool=pool, name=name)
        results[name] = r.results
        print(f"{name:15s} tuned in {r.record['wall_time_s']:.0f} s (training capacity "
              f"{r.record['final_capacity']:.2f}); eval executed {r.results.routing['overall']:.2f}; "
              f"speed-up {r.speed.speedup:.2f}x")
    study.info["num_hidden_layers"] = N
    table = study.table("table2", _table2(results, runs, S["tasks"], N))
    study.table("table2_paper_llama3_8b", pd.DataFrame([{"setting": k, **v} for k, v in PAPER_TABLE2.items()]))
    ci_width = (table.ci_high - table.ci_low)[1:]
    print(f"n per task: {results['dense'].tasks[S['tasks'][0]].n}; 95% CI width of the average difference: "
          f"{ci_width.min():.1f}..{ci_width.max():.1f} points")
    study.finish(train_config=train_config.to_dict(), capacity=CAPACITY,
                 tuning={k: r.record for k, r in runs.items()}, thresholds={k: r.thresholds for k, r in runs.items()},
                 speed={k: r.speed.to_dict() for k, r in runs.items()})
    return study


def _table2(results: dict, runs: dict, tasks: list[str], N: int) -> pd.DataFrame:
    """Ours beside the paper's Table 2 (Llama-3-8B): accuracy per task, average on the same tasks, speed-up."""
    ours = accuracy_table(results, baseline="dense")
    tasks = [t for t in tasks if t in ours.columns]
    paper_dense_avg = paper_tasks_mean(PAPER_TABLE2["dense"], tasks)
    rows = []
    for _, r in ours.iterrows():
        p, speed = PAPER_TABLE2[r.setting], runs[r.setting].speed if r.setting in runs else None
        row = {"setting": r.setting, **speedup_cells(speed), "speedup (paper)": p["speedup"]}
        for t in tasks:
            row[t], row[f"{t} (paper)"] = r[t], p.get(t)
        row.update({"avg": r.avg, "avg (paper, same tasks)": paper_tasks_mean(p, tasks),
                    "diff": r["diff"], "ci_low": r.ci_low, "ci_high": r.ci_high,
                    "diff (paper, same tasks)": paper_tasks_mean(p, tasks) - paper_dense_avg,
                    "avg (paper, 8 tasks)": p["avg"], "executed": r.executed,
                    "skipped share": overall_skip(results[r.setting], N),
                    "skipped share (timing)": 0.0 if speed is None else speed.skipped_share})
        rows.append(row)
    return pd.DataFrame(rows)


def plot(study: Study):
    """Average accuracy − dense per granularity (ours with its paired CI, the paper's beside); table2_diff.png."""
    table, N = study.tables["table2"], study.info["num_hidden_layers"]
    tasks = study.scored_tasks("table2")
    g = table[table.setting != "dense"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    diff_bars(ax, [f"{s}\n{v:.2f}x" for s, v in zip(g.setting, g.speedup)], g,
              f"ours ({study.model_label}, {study.profile})",
              {"paper (Llama-3-8B, same tasks)": g["diff (paper, same tasks)"]})
    ax.set_xlabel("granularity (target_level), measured end-to-end speed-up")
    ax.set_title(f"Table 2: capacity {CAPACITY}, {N // 2} of {N} layers routed ({', '.join(tasks)})")
    save_figure(fig, study.out_dir, "table2_diff")
    return fig


def verdict(study: Study) -> str:
    """Which target keeps most accuracy, attn/sequence against dense, the fastest granularity."""
    table = study.tables["table2"]
    tasks = study.scored_tasks("table2")
    t = table.set_index("setting")
    by = {tg: t.loc[[f"{tg}_token", f"{tg}_sequence"], "diff"].mean() for tg in ("attn", "mlp", "block")}
    paper = {tg: np.mean([t.loc[f"{tg}_{l}", "diff (paper, same tasks)"] for l in ("token", "sequence")]) for tg in by}
    best = max(by, key=by.get)
    a = t.loc["attn_sequence"]
    within = a.ci_low <= 0 <= a.ci_high
    fastest = t.drop("dense").speedup.idxmax()
    return "\n".join([
        f"Ours ({study.model_label}, {study.profile}, tasks {tasks}): average difference to dense per target — "
        + ", ".join(f"{k} {v:+.1f}" for k, v in by.items()) + " points; paper (Llama-3-8B, same tasks): "
        + ", ".join(f"{k} {v:+.1f}" for k, v in paper.items()) + ".",
        f"Attention routing {'is' if best == 'attn' else 'is NOT'} the most accurate target here (best: {best}), "
        f"as in the paper. attn_sequence: {a['diff']:+.1f} [{a.ci_low:+.1f}, {a.ci_high:+.1f}] points "
        f"({'not distinguishable from' if within else 'significantly different from'} dense at 95%), "
        f"{a.speedup:.2f}x end-to-end here vs {a['speedup (paper)']:.2f}x in the paper.",
        f"Fastest granularity here: {fastest} ({t.loc[fastest, 'speedup']:.2f}x); paper: block_sequence (1.26x). "
        f"Measured executed fraction during evaluation ranges {t.drop('dense').executed.min():.2f}–"
        f"{t.drop('dense').executed.max():.2f} (target {CAPACITY}).",
    ])
