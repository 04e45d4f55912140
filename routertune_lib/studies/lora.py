"""Notebook 09: Router-Tuning together with LoRA (Table 8): dense, routers, LoRA, LoRA + routers."""

from __future__ import annotations

from dataclasses import asdict

import matplotlib.pyplot as plt
import pandas as pd

from ..evaluation import PAPER_TASKS, compare, task_prompts
from ..experiments import (accuracy_table, comparison_frame, load_base_model, measure_speedups, overall_skip,
                           profile_train_config, routed_copy, router_record, tuned_adapter, tuned_routers)
from ..paper import PAPER_TABLE8
from ..plots import diff_bars, save_figure
from ..training import LoraSettings
from .protocol import CAPACITY, Study, calibrate, evaluate_setting, mindskip_config, resolved, shots_label

NAME = "09_lora"
SETTINGS = {  # evaluation/timing sizes and LoRA settings; model + tuning budget come from experiments.PROFILES
    "smoke": dict(tasks=["piqa", "boolq"], shots=0, limit=8, calib_per_layer=True, lora_lr=None,
                  lora=dict(r=4, alpha=8.0, dropout=0.05),
                  speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    "cpu": dict(tasks=["piqa", "arc_challenge", "openbookqa"], shots=0, limit=120, calib_per_layer=False,
                lora_lr=None, lora=dict(r=8, alpha=16.0, dropout=0.05),
                speed=dict(batch_size=4, prompt_len=128, num_prompts=4, new_tokens=16, repeats=2)),
    # lr 1e-4 for the LoRA runs (the routers' 1e-5 is too small for adapters; 1e-4 is in the paper's router grid)
    "paper": dict(tasks=list(PAPER_TASKS), shots=None, limit=None, calib_per_layer=True, lora_lr=1e-4,
                  lora=dict(r=8, alpha=16.0, dropout=0.05),
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=128, repeats=3)),
}


def run(profile: str) -> Study:
    """Tune (cached) routers, LoRA alone and LoRA + routers; merge adapters, calibrate routed models to capacity 0.5,
    evaluate and time all four models. Writes ``table8`` (one row per setting, ours beside the paper's),
    ``table8_paper`` and ``lora_router_minus_lora`` (per task + average)."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    print(f"profile {profile}: model {study.model_label}; tuning {P['train_samples']} conversations "
          f"(lr routers {P['lr']}, LoRA runs {S['lora_lr'] or P['lr']}); LoRA {S['lora']}; calibration "
          f"{P['calib_samples']} unlabelled task prompts; tasks {S['tasks']}, {shots_label(S)}, limit {S['limit']} "
          f"docs each; speed {S['speed']}")
    model, tokenizer = load_base_model(P["model"])
    N = model.config.num_hidden_layers
    router_config = mindskip_config(N)  # notebook 01's attn_sequence router
    lora = LoraSettings(**S["lora"])
    lora_lr = {"learning_rate": S["lora_lr"]} if S["lora_lr"] else {}
    configs = {
        "router": profile_train_config(profile),  # notebook 01's router (same cache key)
        "lora": profile_train_config(profile, lora=lora, train_routers=False, **lora_lr),
        "lora_router": profile_train_config(profile, lora=lora, **lora_lr),
    }
    paths = {name: tuned_routers(P["model"], router_config, tc, num_samples=P["train_samples"], model=model,
                                 tokenizer=tokenizer) for name, tc in configs.items()}
    tuning = {name: router_record(p) for name, p in paths.items()}
    calibration = task_prompts(S["tasks"], P["calib_samples"])  # 0-shot contexts from the tasks' training splits
    results = {"dense": evaluate_setting(model, tokenizer, S)}
    for name, r in tuning.items():
        print(f"{name:12s} {r['steps']} steps in {r['wall_time_s']:.0f} s; {r['trainable_parameters']:,} trainable "
              f"parameters; final loss {r['final_loss']:.3f}; training capacity {r['final_capacity']:.2f}")
    thresholds = {}
    with (routed_copy(model, paths["router"]) as router,
          routed_copy(model, adapter_path=tuned_adapter(paths["lora"])) as lora_model,  # routers of this run: inert
          routed_copy(model, paths["lora_router"], tuned_adapter(paths["lora_router"])) as lora_router):
        models = {"router": router, "lora": lora_model, "lora_router": lora_router}
        for name, m in models.items():
            if getattr(m, "routertune", None) is not None:
                thresholds[name] = calibrate(m, calibration, CAPACITY, S["calib_per_layer"], tokenizer)
            results[name] = evaluate_setting(m, tokenizer, S)
        speed = measure_speedups(model, models, **S["speed"]).set_index("setting")
    study.info.update(num_hidden_layers=N, tuning=tuning)
    table = study.table("table8", _table8(results, speed, tuning, N))
    study.table("table8_paper", pd.DataFrame([{"model": m, **p} for m, p in PAPER_TABLE8.items()]))
    # b − a: the cost of routing on top of LoRA
    study.table("lora_router_minus_lora", comparison_frame(compare(results["lora"], results["lora_router"])))
    ci_width = (table.ci_high - table.ci_low)[1:]
    print(f"n per task: {results['dense'].tasks[S['tasks'][0]].n}; 95% CI width of the average difference: "
          f"{ci_width.min():.1f}..{ci_width.max():.1f} points")
    study.finish(router_config=asdict(router_config), train_configs={k: v.to_dict() for k, v in configs.items()},
                 capacity=CAPACITY, tuning=tuning, checkpoints={k: str(v) for k, v in paths.items()},
                 thresholds=thresholds, speed=speed.reset_index().to_dict(orient="records"),
                 lora_merged_before_eval_and_timing=True)
    return study


def _table8(results: dict, speed: pd.DataFrame, tuning: dict, N: int) -> pd.DataFrame:
    ours = accuracy_table(results, baseline="dense")
    tuned = list(results)[1:]
    ours["skipped share"] = [overall_skip(results[k], N) for k in results]
    ours["speedup"] = [speed.loc[k, "speedup"] for k in results]
    ours["train capacity"] = [None] + [tuning[k]["final_capacity"] for k in tuned]
    ours["trainable"] = [0] + [tuning[k]["trainable_parameters"] for k in tuned]
    ours["tuning s"] = [0.0] + [tuning[k]["wall_time_s"] for k in tuned]
    for m, p in PAPER_TABLE8.items():
        ours[f"avg (paper, {m})"] = [p[k] for k in results]
        ours[f"diff (paper, {m})"] = [p[k] - p["dense"] for k in results]
        ours[f"speedup (paper, {m})"] = [p.get(f"{k}_speedup", 1.0) for k in results]
    return ours


def plot(study: Study):
    """Accuracy − dense per setting (ours with CI, the paper's two models) with measured speed-ups; saves
    table8_diff.png."""
    table, N = study.tables["table8"], study.info["num_hidden_layers"]
    g = table[table.setting != "dense"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    diff_bars(ax, [f"{s}\n{v:.2f}x here" for s, v in zip(g.setting, g.speedup)], g,
              f"ours ({study.model_label}, {study.profile}, {', '.join(study.scored_tasks('table8'))})",
              {f"paper ({m}, 8 tasks)": g[f"diff (paper, {m})"] for m in PAPER_TABLE8})
    ax.set_xlabel("setting, measured end-to-end speed-up (LoRA merged, real skipping)")
    ax.set_title(f"Table 8: LoRA and Router-Tuning, capacity {CAPACITY}, {N // 2} of {N} layers routed")
    save_figure(fig, study.out_dir, "table8_diff")
    return fig


def verdict(study: Study) -> str:
    """LoRA vs dense, routers on top of LoRA vs LoRA alone (paired CIs), speed-ups and executed fractions."""
    t, tuning = study.tables["table8"].set_index("setting"), study.info["tuning"]
    pa = study.tables["lora_router_minus_lora"].set_index("task").loc["average"]
    fmt = lambda s: f"{t.loc[s, 'diff']:+.1f} [{t.loc[s, 'ci_low']:+.1f}, {t.loc[s, 'ci_high']:+.1f}]"
    sig = lambda lo, hi: "significant" if resolved(lo, hi) else "not significant"
    return "\n".join([
        f"Ours ({study.model_label}, {study.profile}, tasks {study.scored_tasks('table8')}): dense "
        f"{t.loc['dense', 'avg']:.1f}%; "
        f"Router-Tuning {fmt('router')} ({t.loc['router', 'speedup']:.2f}x), LoRA {fmt('lora')} "
        f"({t.loc['lora', 'speedup']:.2f}x), LoRA + Router-Tuning {fmt('lora_router')} "
        f"({t.loc['lora_router', 'speedup']:.2f}x) points vs dense. Paper: " + "; ".join(
            f"{m} RT {p['router'] - p['dense']:+.1f} ({p['router_speedup']:.2f}x), LoRA {p['lora'] - p['dense']:+.1f}, "
            f"LoRA+RT {p['lora_router'] - p['dense']:+.1f} ({p['lora_router_speedup']:.2f}x)"
            for m, p in PAPER_TABLE8.items()),
        f"LoRA {'improves on' if t.loc['lora', 'diff'] > 0 else 'does NOT improve on'} dense here "
        f"({sig(t.loc['lora', 'ci_low'], t.loc['lora', 'ci_high'])} at 95%; paper: +1.4 / +0.8 points).",
        f"Adding routers to LoRA changes accuracy by {pa['diff']:+.1f} [{pa.ci_low:+.1f}, {pa.ci_high:+.1f}] points vs "
        f"LoRA alone ({sig(pa.ci_low, pa.ci_high)} at 95%; paper: -0.1 / +0.1); routing the dense model changes it by "
        f"{t.loc['router', 'diff']:+.1f} (paper -0.1 / -0.3). LoRA + RT runs "
        f"{t.loc['lora_router', 'speedup']:.2f}x vs Router-Tuning's {t.loc['router', 'speedup']:.2f}x and merged "
        f"LoRA's {t.loc['lora', 'speedup']:.2f}x (paper: the same speed-up with and without LoRA).",
        f"Executed fraction during evaluation: router {t.loc['router', 'executed']:.2f}, LoRA + RT "
        f"{t.loc['lora_router', 'executed']:.2f} (target {CAPACITY}); training capacity (threshold 0.5): router "
        f"{tuning['router']['final_capacity']:.2f}, LoRA + RT {tuning['lora_router']['final_capacity']:.2f}.",
    ])
