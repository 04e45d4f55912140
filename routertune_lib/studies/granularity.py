"""Notebook 01: what to route (attention / MLP / block) and per what (token / sequence), Table 2."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..evaluation import PAPER_TASKS, task_prompts
from ..experiments import load_base_model, paper_tasks_mean, profile_train_config, speedup_cells
from ..paper import PAPER_TABLE2
from ..plots import diff_bars, save_figure
from ..routing import RouterConfig
from .protocol import (CAPACITY, Study, dense_row, mindskip_config, reference_for, score_row, shots_label,
                       task_means, timing_pool, tuned_run)

NAME = "01_granularity"
SETTINGS = {  # evaluation and timing sizes; model + tuning budget come from experiments.PROFILES (shared by notebooks)
    "smoke": dict(tasks=["piqa", "boolq"], shots=0, limit=8, calib_per_layer=True, n_boot=1000,
                  speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    # cpu: the tasks SmolLM2-135M is clearly above chance on (results/task_selection); timing: 5 interleaved rounds
    # of batch 8 x 256-token task prompts, 32 new tokens (benchmarks/speed.py times the paper's 512 / 64 workload)
    "cpu": dict(tasks=["arc_easy", "piqa"], shots=0, limit=200, calib_per_layer=True, n_boot=2000,
                speed=dict(batch_size=8, prompt_len=256, num_prompts=8, new_tokens=32, repeats=5)),
    "paper": dict(tasks=list(PAPER_TASKS), shots=None, limit=None, calib_per_layer=True, n_boot=2000,
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=128, repeats=5)),
}
GRANULARITIES = [(t, l) for t in ("block", "mlp", "attn") for l in ("token", "sequence")]  # Table 2's row order


def run(profile: str) -> Study:
    """Tune (cached), calibrate to capacity 0.5, score (one fidelity pass against the dense model's cached outputs:
    accuracy and KL, paired per document) and time each granularity; writes ``table2`` (dense + six granularities,
    ours beside the paper's) and ``table2_paper_llama3_8b``."""
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
    reference = reference_for(model, tokenizer, S)
    print(f"{N} layers; routed: {RouterConfig(num_layers=N // 2).resolve_layers(N)}")
    runs = {}
    for target, level in GRANULARITIES:
        name = f"{target}_{level}"
        r = runs[name] = tuned_run(P["model"], model, tokenizer, mindskip_config(N, target=target, level=level),
                                   train_config, S, calibration, num_samples=P["train_samples"],
                                   timing_pool=pool, name=name, reference=reference)
        print(f"{name:15s} tuned in {r.record['wall_time_s']:.0f} s (training capacity "
              f"{r.record['final_capacity']:.2f}); eval executed {r.results.routing['overall']:.2f}; "
              f"speed-up {r.speed.speedup:.2f}x")
    study.info["num_hidden_layers"] = N
    table = study.table("table2", _table2(runs, S, N))
    study.table("table2_paper_llama3_8b", pd.DataFrame([{"setting": k, **v} for k, v in PAPER_TABLE2.items()]))
    ci_width, kl_width = (table.ci_high - table.ci_low)[1:], (table.kl_ci_high - table.kl_ci_low)[1:]
    print(f"n per task: {S['limit']}; 95% CI width of the average accuracy difference: {ci_width.min():.1f}.."
          f"{ci_width.max():.1f} points, of the KL: {kl_width.min():.3f}..{kl_width.max():.3f} nats")
    study.finish(train_config=train_config.to_dict(), capacity=CAPACITY,
                 tuning={k: r.record for k, r in runs.items()}, thresholds={k: r.thresholds for k, r in runs.items()},
                 speed={k: r.speed.to_dict() for k, r in runs.items()})
    return study


def _table2(runs: dict, S: dict, N: int) -> pd.DataFrame:
    """Ours beside the paper's Table 2 (Llama-3-8B): accuracy per task, average on the same tasks and its paired
    difference to dense, KL to dense, speed-up with its CI and executed FLOP fraction."""
    tasks = S["tasks"]
    paper_dense_avg = paper_tasks_mean(PAPER_TABLE2["dense"], tasks)
    some = next(iter(runs.values())).results
    rows = []
    for name in ["dense", *runs]:
        p, run = PAPER_TABLE2[name], runs.get(name)
        means = task_means(some).ref_accuracy if run is None else task_means(run.results).accuracy  # per task
        cells = dense_row(some) if run is None else score_row(run.results, S["n_boot"], N)
        row = {"setting": name, **speedup_cells(None if run is None else run.speed), "speedup (paper)": p["speedup"],
               "flop_fraction": 1.0 if run is None else run.speed.flop_fraction}
        for t in tasks:
            row[t], row[f"{t} (paper)"] = 100 * means[t], p.get(t)
        row.update({"avg": cells["avg"], "avg (paper, same tasks)": paper_tasks_mean(p, tasks),
                    **{k: v for k, v in cells.items() if k != "avg"},
                    "diff (paper, same tasks)": paper_tasks_mean(p, tasks) - paper_dense_avg,
                    "avg (paper, 8 tasks)": p["avg"],
                    "skipped share (timing)": 0.0 if run is None else run.speed.skipped_share})
        rows.append(row)
    return pd.DataFrame(rows)


def plot(study: Study):
    """Per granularity: average accuracy − dense (ours with its paired CI, the paper's beside; left) and KL(dense ||
    model) with its 95% CI (right); labels carry the measured speed-up and the executed FLOP fraction;
    table2_diff.png."""
    table, N = study.tables["table2"], study.info["num_hidden_layers"]
    tasks = study.scored_tasks("table2")
    g = table[table.setting != "dense"]
    labels = [f"{s}\n{v:.2f}x, {f:.2f}" for s, v, f in zip(g.setting, g.speedup, g.flop_fraction)]
    fig, (ax, axk) = plt.subplots(1, 2, figsize=(13, 3.8))
    diff_bars(ax, labels, g, f"ours ({study.model_label}, {study.profile})",
              {"paper (Llama-3-8B, same tasks)": g["diff (paper, same tasks)"]})
    x = np.arange(len(g))
    axk.bar(x, g.kl, yerr=[g.kl - g.kl_ci_low, g.kl_ci_high - g.kl], capsize=4)
    axk.set_xticks(x, labels)
    axk.set_ylabel("KL(dense || model), nats / token")
    for a in (ax, axk):
        a.set_xlabel("granularity (target_level), speed-up, FLOP fraction", fontsize=8)
        a.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Table 2: capacity {CAPACITY}, {N // 2} of {N} layers routed ({', '.join(tasks)}; 95% CIs)")
    fig.tight_layout()
    save_figure(fig, study.out_dir, "table2_diff")
    return fig


def verdict(study: Study) -> str:
    """Which target keeps most accuracy and stays closest to dense (KL), attn/sequence against dense, the fastest
    granularity (with CIs)."""
    table = study.tables["table2"]
    tasks = study.scored_tasks("table2")
    t = table.set_index("setting")
    by = {tg: t.loc[[f"{tg}_token", f"{tg}_sequence"], "diff"].mean() for tg in ("attn", "mlp", "block")}
    kl = {tg: t.loc[[f"{tg}_token", f"{tg}_sequence"], "kl"].mean() for tg in by}
    paper = {tg: np.mean([t.loc[f"{tg}_{l}", "diff (paper, same tasks)"] for l in ("token", "sequence")]) for tg in by}
    best, closest = max(by, key=by.get), min(kl, key=kl.get)
    a = t.loc["attn_sequence"]
    within = a.ci_low <= 0 <= a.ci_high
    fastest = t.drop("dense").speedup.idxmax()
    f = t.loc[fastest]
    return "\n".join([
        f"Ours ({study.model_label}, {study.profile}, tasks {tasks}): average difference to dense per target — "
        + ", ".join(f"{k} {v:+.1f}" for k, v in by.items()) + " points; KL to dense "
        + ", ".join(f"{k} {v:.3f}" for k, v in kl.items()) + " nats; paper (Llama-3-8B, same tasks): "
        + ", ".join(f"{k} {v:+.1f}" for k, v in paper.items()) + " points.",
        f"Attention routing {'is' if best == 'attn' else 'is NOT'} the most accurate target here (best: {best}) "
        f"and {'is' if closest == 'attn' else 'is NOT'} the closest to dense in KL (closest: {closest}); in the paper "
        f"it is the most accurate. attn_sequence: {a['diff']:+.1f} [{a.ci_low:+.1f}, {a.ci_high:+.1f}] points "
        f"({'not distinguishable from' if within else 'significantly different from'} dense at 95%), KL "
        f"{a.kl:.3f} [{a.kl_ci_low:.3f}, {a.kl_ci_high:.3f}], {a.speedup:.2f}x [{a['speedup ci_low']:.2f}, "
        f"{a['speedup ci_high']:.2f}] end-to-end here vs {a['speedup (paper)']:.2f}x in the paper.",
        f"Fastest granularity here: {fastest} ({f.speedup:.2f}x [{f['speedup ci_low']:.2f}, "
        f"{f['speedup ci_high']:.2f}], FLOP fraction {f.flop_fraction:.3f}); paper: block_sequence (1.26x). "
        f"Measured executed fraction during evaluation ranges {t.drop('dense').executed.min():.2f}–"
        f"{t.drop('dense').executed.max():.2f} (target {CAPACITY}).",
    ])
