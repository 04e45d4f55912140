"""Notebook 03: Router-Tuning vs static attention drop on a generative exact-match task (Figure 3)."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..baselines import attach_static_drop, least_important, module_importance
from ..evaluation import compare, evaluate, task_prompts
from ..experiments import (conversation_batches, load_base_model, measure_speedups, overall_skip,
                           profile_train_config, routed_copy, router_record, speedup_cells, tuned_routers)
from ..paper import PAPER_FIGURE3
from ..plots import baseline, ci_yerr, save_figure
from ..routing import load_routers
from ..speed import text_prompt_pool
from .protocol import CALIB_MAX_LENGTH, Study, calibrate, mindskip_config, resolved

NAME = "03_generation_vs_attention_drop"
SETTINGS = {  # task, evaluation and timing sizes; model + tuning budget come from experiments.PROFILES (shared)
    "smoke": dict(task="arithmetic_plus", shots=2, limit=8, calib_per_layer=True, speed_prompts=2, prompt_len=16,
                  speed=dict(batch_size=2, new_tokens=4, repeats=1)),
    "cpu": dict(task="arithmetic_plus", shots=5, limit=120, calib_per_layer=False, speed_prompts=8, prompt_len=96,
                speed=dict(batch_size=4, new_tokens=16, repeats=2)),
    "paper": dict(task="gsm8k", shots=5, limit=None, calib_per_layer=True, speed_prompts=64, prompt_len=512,
                  speed=dict(batch_size=32, new_tokens=256, repeats=3)),
}
SKIPS = [0.125, 0.25]  # share of all layers' attention skipped (Figure 3's two points)
LABELS = {"attn_drop": "static attention drop (LLM-Drop)", "router": "Router-Tuning"}


def timing_prompts(tokenizer, S: dict):
    """``[speed_prompts, prompt_len]`` token ids of few-shot task prompts (unseen by calibration) for timing."""
    texts = task_prompts(S["task"], S["speed_prompts"], seed=1, num_fewshot=S["shots"])
    return text_prompt_pool(tokenizer, texts, S["speed_prompts"], S["prompt_len"])


def run(profile: str) -> Study:
    """Dense, the cached attention router calibrated to 12.5% / 25% of all attention skipped and the static drop of
    as much attention: exact match (paired CI), skipped share, speed-up. Writes ``figure3`` (dense + two rows per
    skip level) and ``figure3_router_minus_drop`` (one row per skip level)."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    print(f"profile {profile}: model {study.model_label}; task {S['task']} {S['shots']}-shot, limit {S['limit']} docs; "
          f"calibration {P['calib_samples']} unlabelled {S['shots']}-shot prompts "
          f"({'per layer' if S['calib_per_layer'] else 'one global threshold'}); speed: {S['speed_prompts']} task "
          f"prompts x last {S['prompt_len']} tokens, {S['speed']}")
    model, tokenizer = load_base_model(P["model"])
    N = model.config.num_hidden_layers
    train_config = profile_train_config(profile)
    router_config = mindskip_config(N)
    path = tuned_routers(P["model"], router_config, train_config, num_samples=P["train_samples"], model=model,
                         tokenizer=tokenizer)
    layers = router_config.resolve_layers(N)
    calibration = task_prompts(S["task"], P["calib_samples"], num_fewshot=S["shots"])  # unlabelled, eval format
    importance = module_importance(model, conversation_batches(calibration, tokenizer, CALIB_MAX_LENGTH,
                                                               device=model.device))
    speed_prompts = timing_prompts(tokenizer, S)
    evaluate_ = lambda m: evaluate(m, tokenizer, [S["task"]], num_fewshot=S["shots"], limit=S["limit"])
    results = {("dense", 0.0): evaluate_(model)}
    dense = results["dense", 0.0].tasks[S["task"]]
    print(f"{N} layers, routed {layers}; router tuned in {router_record(path)['wall_time_s']:.0f} s; dense exact "
          f"match {100 * dense.score:.1f}% on {dense.n} docs")

    routed = load_routers(copy.deepcopy(model), path)
    thresholds, dropped, speed = {}, {}, {}
    for skip in SKIPS:  # router: capacity 1 − skip·N/n of the n routed layers; drop: round(N·skip) layers (≥ 1)
        capacity = 1 - skip * N / len(layers)
        thresholds[skip] = calibrate(routed, calibration, capacity, S["calib_per_layer"], tokenizer)
        dropped[skip] = least_important(importance["attn"], max(1, round(N * skip)), candidates=layers)
        with routed_copy(model) as static:
            attach_static_drop(static, "attn", dropped[skip])
            results["router", skip], results["attn_drop", skip] = evaluate_(routed), evaluate_(static)
            speed[skip] = measure_speedups(model, {"router": routed, "attn_drop": static}, speed_prompts,
                                           **S["speed"]).set_index("setting")
        print(f"skip {skip:.1%}: router capacity {capacity:.3f}, measured skipped share "
              f"{overall_skip(results['router', skip], N):.3f}; attention drop of layers {dropped[skip]} "
              f"({len(dropped[skip]) / N:.3f})")
    del routed
    study.info.update(num_hidden_layers=N, dense_n=dense.n,
                      layers_by_skip={s: results["router", s].routing["layers"] for s in SKIPS}, dropped=dropped)
    table = study.table("figure3", _figure3(results, speed, dropped, S["task"], N, len(layers)))
    vs_drop = {skip: compare(results["attn_drop", skip], results["router", skip])["tasks"][S["task"]]
               for skip in SKIPS}
    study.table("figure3_router_minus_drop", pd.DataFrame([
        {"target skip": s, "n": r["n"], "attn_drop": 100 * r["a"], "router": 100 * r["b"], "diff": 100 * r["diff"],
         "ci_low": 100 * r["ci_low"], "ci_high": 100 * r["ci_high"], "agreement": r["agreement"],
         "diff (paper)": PAPER_FIGURE3["router"][s] - PAPER_FIGURE3["attn_drop"][s]} for s, r in vs_drop.items()]))
    w = (table.ci_high - table.ci_low)[1:]
    print(f"n = {dense.n} docs; 95% CI width of the difference to dense: {w.min():.1f}..{w.max():.1f} points")
    study.finish(train_config=train_config.to_dict(), router_config=router_config, router_checkpoint=str(path),
                 router_record=router_record(path), routed_layers=layers, skips=SKIPS, thresholds=thresholds,
                 dropped_layers=dropped,
                 speed={str(k): v.reset_index().to_dict("records") for k, v in speed.items()},
                 eval_routing={f"{m}_{s}": e.routing for (m, s), e in results.items()})
    return study


def _figure3(results: dict, speed: dict, dropped: dict, task: str, N: int, n_routed: int) -> pd.DataFrame:
    dense = results["dense", 0.0]
    rows = []
    for (method, skip), e in results.items():
        d = compare(dense, e)["tasks"][task] if method != "dense" else dict(diff=0.0, ci_low=0.0, ci_high=0.0)
        sp = speed[skip].loc[method] if method != "dense" else None
        rows.append({"method": method, "target skip": skip,
                     "capacity": 1 - skip * N / n_routed if method == "router" else None,
                     "dropped layers": len(dropped[skip]) if method == "attn_drop" else 0,
                     "exact match": 100 * e.tasks[task].score, "diff": 100 * d["diff"], "ci_low": 100 * d["ci_low"],
                     "ci_high": 100 * d["ci_high"], "exact match (paper)": PAPER_FIGURE3[method].get(skip),
                     "skipped share (generation)": overall_skip(e, N),
                     "skipped share (timing prompts)": 0.0 if sp is None else sp.skipped_share,
                     **speedup_cells(sp, "speed-up"), "kv ratio": 1.0 if sp is None else sp.kv_ratio,
                     "eval generation s": e.tasks[task].seconds, "eval cached": e.tasks[task].cached})
    table = pd.DataFrame(rows)
    table["eval speed-up"] = table["eval generation s"].iloc[0] / table["eval generation s"]
    return table


def plot(study: Study):
    """Exact match (ours, with CIs; the paper's) and speed-up per skip level and method; saves figure3.png."""
    table, S = study.tables["figure3"], study.settings
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x, w = np.arange(len(SKIPS)), 0.35
    for i, (m, label) in enumerate(LABELS.items()):
        g = table[table.method == m]
        axes[0].bar(x + (i - 0.5) * w, g["exact match"], w, label=label, yerr=ci_yerr(g), capsize=4)
        axes[1].bar(x + (i - 0.5) * w, [PAPER_FIGURE3[m][s] for s in SKIPS], w, label=label)
        axes[2].bar(x + (i - 0.5) * w, g["speed-up"], w, label=label)
    for ax, y in zip(axes, (table["exact match"].iloc[0], PAPER_FIGURE3["dense"][0.0], 1.0)):
        baseline(ax, y, "dense")
    titles = [f"ours: {study.model_label}, {S['task']} {S['shots']}-shot (95% paired CI vs dense)",
              "paper: Llama-3-8B, GSM8K 5-shot (chart)", f"ours: end-to-end generation speed-up ({study.profile})"]
    for ax, title, ylabel in zip(axes, titles, ["exact match (%)", "exact match (%)", "speed-up over dense (x)"]):
        ax.set_xticks(x, [f"{s:.1%} skipped" for s in SKIPS])
        ax.set_xlabel("share of all layers' attention skipped")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure(fig, study.out_dir, "figure3")
    return fig


def verdict(study: Study) -> str:
    """Router vs static drop at each skip level (paired CI), and whether the direction of the claim holds."""
    S, task = study.settings, study.settings["task"]
    t = study.tables["figure3"].set_index(["method", "target skip"])
    vs = study.tables["figure3_router_minus_drop"].set_index("target skip")
    lines = [f"Dense: {t.loc[('dense', 0.0), 'exact match']:.1f}% exact match ({study.model_label}, {task} "
             f"{S['shots']}-shot, n={study.info['dense_n']}); paper (Llama-3-8B, GSM8K): "
             f"{PAPER_FIGURE3['dense'][0.0]}%."]
    for skip, r in vs.iterrows():
        rt, dr = t.loc[("router", skip)], t.loc[("attn_drop", skip)]
        lines.append(f"{skip:.1%} of attention skipped (measured: router {rt['skipped share (generation)']:.3f}, drop "
                     f"{dr['skipped share (generation)']:.3f}): Router-Tuning {rt['exact match']:.1f}% vs attention "
                     f"drop {dr['exact match']:.1f}% -> {r['diff']:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}] points "
                     f"({'significant' if resolved(r.ci_low, r.ci_high) else 'not significant'} at 95%); paper "
                     f"{r['diff (paper)']:+.1f}. Speed-up router {rt['speed-up']:.2f}x, drop {dr['speed-up']:.2f}x.")
    holds = bool((vs["diff"] > 0).all())
    all_resolved = all(resolved(lo, hi) for lo, hi in zip(vs.ci_low, vs.ci_high))
    lines.append(f"Direction of the claim (router above static drop at both skip levels): "
                 f"{'holds' if holds else 'does NOT hold'} here; "
                 f"{'both differences are resolved' if all_resolved else 'not every difference is resolved'} by the "
                 "95% CIs.")
    for skip in SKIPS:  # with one global threshold, how much of the routing is per sequence rather than per layer
        f = study.info["layers_by_skip"][skip]
        lines.append(f"{skip:.1%}: routed layers always skipped {sorted(i for i, v in f.items() if v == 0)}, skipped "
                     f"by part of the sequences {sorted(i for i, v in f.items() if 0 < v < 1)}; static drop "
                     f"{study.info['dropped'][skip]}.")
    return "\n".join(lines)
