"""Notebook 08: Mixture-of-Experts: expert routers vs Expert Drop (Table 7) and the expert load (Figure 8)."""

from __future__ import annotations

import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..evaluation import PAPER_TASKS, task_prompts
from ..experiments import (accuracy_table, measure_speedups, profile_train_config, router_record, speedup_cells,
                           tuned_routers)
from ..models import load_model
from ..moe import (attach_expert_drop, expert_drop_plan, expert_router_config, expert_statistics, moe_layers,
                   normalised_load, real_vs_masked, tiny_random_moe)
from ..paper import PAPER_FIGURE8, PAPER_TABLE7
from ..plots import save_figure
from ..routing import load_routers, routed_layers
from .protocol import CALIB_MAX_LENGTH, Study, calibrate, evaluate_setting, shots_label, timing_pool

NAME = "08_moe"
RANDOM = "mechanics only, random weights"
SETTINGS = {  # models, evaluation and timing sizes; the tuning budget comes from experiments.PROFILES
    "smoke": dict(models=[dict(name="tiny random OLMoE", paper="OLMoE",
                               random=dict(num_layers=2, hidden_size=64, intermediate_size=64, num_experts=8,
                                           top_k=2))],
                  tasks=["piqa", "boolq"], shots=0, limit=8, skip=0.25,
                  speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    "cpu": dict(models=[dict(name="random OLMoE-arch (8 layers, 16 experts, top-4)", paper="OLMoE",
                             random=dict(num_layers=8, hidden_size=256, intermediate_size=768, num_experts=16,
                                         top_k=4))],
                tasks=["piqa", "arc_challenge", "openbookqa"], shots=0, limit=120, skip=0.25,
                speed=dict(batch_size=4, prompt_len=128, num_prompts=4, new_tokens=16, repeats=5)),
    "paper": dict(models=[dict(name="OLMoE-1B-7B", paper="OLMoE", hub="allenai/OLMoE-1B-7B-0924"),
                          dict(name="DeepSeek-V2-Lite", paper="DeepSeek-MoE", hub="deepseek-ai/DeepSeek-V2-Lite")],
                  tasks=list(PAPER_TASKS), shots=None, limit=None, skip=0.25,
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=128, repeats=5)),
}
COLORS = {"dense": "gray", "Expert Drop": "tab:orange", "Router-Tuning": "tab:blue"}
MAX_LOAD = {"assigned_load": "max load, gate (dense)",  # load column -> its per-layer maximum's column
            "Router-Tuning executed_load": "max load, Router-Tuning executed",
            "Expert Drop executed_load": "max load, Expert Drop executed"}


def run(profile: str) -> Study:
    """Per model: expert routers (cached) calibrated to execute 1 − skip of the assignments, Expert Drop of as many
    assignments, dense: accuracy, speed-up, expert load, real == masked. Writes ``table7`` (three rows per model),
    ``real_vs_masked`` (two per model), ``figure8_expert_load`` (one row per layer x expert) and
    ``figure8_max_load_per_layer`` (one per model x layer)."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    capacity = 1 - S["skip"]
    train_config = profile_train_config(profile)
    prompts = task_prompts(S["tasks"], 2 * P["calib_samples"])  # 0-shot contexts from the tasks' training splits
    calibration, probe = prompts[: P["calib_samples"]], prompts[P["calib_samples"] :]  # probe: load, real==masked
    print(f"profile {profile}: models {[m['name'] for m in S['models']]}; tuning {P['train_samples']} conversations; "
          f"calibration {P['calib_samples']} task prompts; tasks {S['tasks']}, {shots_label(S)}, limit {S['limit']} "
          f"docs each; {S['skip']:.0%} of expert assignments skipped; speed {S['speed']}")
    tables, loads, checks, info = [], [], [], {}
    for spec in S["models"]:
        t0 = time.time()
        label = f"{spec['name']} ({RANDOM})" if "random" in spec else spec["name"]
        model, tokenizer = tiny_random_moe(**spec["random"]) if "random" in spec else load_model(spec["hub"])
        path = tuned_routers(spec.get("hub"), expert_router_config(model, capacity=capacity, capacity_weight=0.1),
                             train_config, num_samples=P["train_samples"], model=model, tokenizer=tokenizer)
        importance = expert_statistics(model, calibration, tokenizer, CALIB_MAX_LENGTH)  # gate weight mass per expert
        plan, planned = expert_drop_plan(importance, S["skip"])
        drop = attach_expert_drop(copy.deepcopy(model), plan)
        routed = load_routers(copy.deepcopy(model), path)
        calibrate(routed, calibration, capacity, False, tokenizer)
        results = {"dense": evaluate_setting(model, tokenizer, S), "Expert Drop": evaluate_setting(drop, tokenizer, S),
                   "Router-Tuning": evaluate_setting(routed, tokenizer, S)}
        speed_prompts = timing_pool(tokenizer, S["tasks"], S["speed"])
        speed = measure_speedups(model, {"Expert Drop": drop, "Router-Tuning": routed}, speed_prompts,
                                 **S["speed"]).set_index("setting")
        tables.append(_table7_rows(results, speed, label, PAPER_TABLE7[spec["paper"]], spec["paper"]))
        # Figure 8: gate assignments (dense) vs tokens executed after router filtering / Expert Drop, held-out prompts
        load = normalised_load(expert_statistics(model, probe, tokenizer, CALIB_MAX_LENGTH))
        for name, m in (("Router-Tuning", routed), ("Expert Drop", drop)):
            after = normalised_load(expert_statistics(m, probe, tokenizer, CALIB_MAX_LENGTH))
            load[f"{name} executed_load"] = after.executed_load.values
            load[f"{name} assigned_load"] = after.assigned_load.values
            checks.append({"model": label, "setting": name, **real_vs_masked(m, probe, tokenizer, CALIB_MAX_LENGTH)})
        loads.append(load.assign(model=label))
        info[label] = {"router_checkpoint": str(path), "training": router_record(path), "moe_layers": moe_layers(model),
                       "num_experts": int(importance.expert.max() + 1), "top_k": model.config.num_experts_per_tok,
                       "expert_drop": {str(i): e for i, e in plan.items()}, "expert_drop_planned_share": planned,
                       "thresholds": sorted({m_.routing.threshold for m_ in routed_layers(routed).values()}),
                       "wall_time_s": time.time() - t0}
        print(f"{label}: n per task {results['dense'].tasks[S['tasks'][0]].n}; Expert Drop removes "
              f"{sum(len(e) for e in plan.values())} experts (planned {planned:.1%} of calibration assignments)")
        del model, routed, drop
    study.table("table7", pd.concat(tables, ignore_index=True))
    study.table("real_vs_masked", pd.DataFrame(checks), floatfmt=".3g")
    loads = study.table("figure8_expert_load", pd.concat(loads, ignore_index=True))
    study.table("figure8_max_load_per_layer",
                loads.groupby(["model", "layer"])[list(MAX_LOAD)].max().reset_index().rename(columns=MAX_LOAD))
    study.info["figure8_names"] = {f"{s['name']} ({RANDOM})" if "random" in s else s["name"]: s["paper"]
                                   for s in S["models"]}
    study.finish(train_config=train_config.to_dict(),
                 router_config={"target": "experts", "level": "token", "capacity": capacity, "capacity_weight": 0.1},
                 models=info)
    return study


def _table7_rows(results: dict, speed: pd.DataFrame, label: str, paper: dict, paper_model: str) -> pd.DataFrame:
    t = accuracy_table(results, baseline="dense")
    t.insert(0, "model", label)
    t["skipped share"] = 1 - t.executed
    cells = pd.DataFrame([speedup_cells(speed.loc[s]) for s in t.setting], index=t.index)
    t[list(cells.columns)] = cells
    t["generate_s"] = [speed.loc[s, "generate_s"] for s in t.setting]
    t["skipped share (timing)"] = [speed.loc[s, "skipped_share"] for s in t.setting]
    t["paper model"] = paper_model
    t["paper avg"] = [paper["dense"], paper["expert_drop"], paper["router"]]
    t["paper speedup"] = [1.0, paper["expert_drop_speedup"], paper["router_speedup"]]
    return t


def plot_table7(study: Study):
    """Accuracy against speed-up per setting, and the measured skipped share; saves table7.png."""
    table7, S = study.tables["table7"], study.settings
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for model_label, g in table7.groupby("model", sort=False):
        for _, r in g.iterrows():
            ax.errorbar(r.speedup, r.avg, yerr=[[r["diff"] - r.ci_low], [r.ci_high - r["diff"]]], marker="o",
                        capsize=3, color=COLORS[r.setting], label=r.setting if model_label == table7.model[0] else None)
    ax.axhline(table7.avg[table7.setting == "dense"].iloc[0], color="gray", ls="--", lw=1, label="dense accuracy")
    ax.axvline(1.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("end-to-end generation speed-up over dense (x, real skipping)")
    ax.set_ylabel(f"average accuracy (%), {len(S['tasks'])} tasks")
    ax.set_title("Table 7: 25% of expert assignments skipped" + (f"\n({RANDOM})" if study.profile != "paper" else ""))
    ax.legend(fontsize=8)
    ax = axes[1]
    x = np.arange(len(table7))
    ax.bar(x, table7["skipped share"], color=[COLORS[s] for s in table7.setting])
    ax.axhline(S["skip"], color="black", ls="--", lw=1, label=f"target {S['skip']:.0%}")
    ax.set_xticks(x, [f"{s}\n{m[:18]}" for s, m in zip(table7.setting, table7.model)], fontsize=7)
    ax.set_ylabel("skipped share of expert assignments (evaluation)")
    ax.set_title("measured skipping ratio")
    ax.legend(fontsize=8)
    save_figure(fig, study.out_dir, "table7")
    return fig


def plot_figure8(study: Study) -> list:
    """Per model: the expert loads of the most overloaded layer, and the maximum load per layer beside the paper's;
    saves figure8_<paper model>.png."""
    loads, fig8 = study.tables["figure8_expert_load"], study.tables["figure8_max_load_per_layer"]
    figures = []
    for model_label, g in loads.groupby("model", sort=False):
        worst = int(g.loc[g.assigned_load.idxmax(), "layer"])
        w = g[g.layer == worst].sort_values("assigned_load", ascending=False)
        m8 = fig8[fig8.model == model_label]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        xs = np.arange(len(w))
        for k, (col, name) in enumerate([("assigned_load", "gate assignment (dense)"),
                                         ("Router-Tuning executed_load", "executed after router filtering"),
                                         ("Expert Drop executed_load", "executed after Expert Drop")]):
            axes[0].bar(xs + (k - 1) * 0.27, w[col], 0.27, label=name)
        axes[0].set_xticks(xs, w.expert.astype(int), fontsize=7)
        axes[0].set_xlabel(f"expert of layer {worst} (sorted by gate load)")
        axes[0].set_ylabel("tokens processed / layer mean (x)")
        for col, marker in zip(MAX_LOAD.values(), "os^"):
            axes[1].plot(m8.layer, m8[col], marker=marker, label=col)
        axes[1].axhline(PAPER_FIGURE8["max_load_before"], color="gray", ls=":", lw=1, label="paper: before (6.7x)")
        axes[1].axhline(PAPER_FIGURE8["max_load_after"], color="tab:blue", ls=":", lw=1, label="paper: after (1.9x)")
        axes[1].set_xlabel("MoE layer (0-based)")
        axes[1].set_ylabel("most loaded expert / layer mean (x)")
        for ax in axes:
            ax.axhline(1.0, color="black", ls="--", lw=1, label="mean load (balanced)")
            ax.legend(fontsize=7)
        fig.suptitle(f"Figure 8: expert load, {model_label}")
        save_figure(fig, study.out_dir, f"figure8_{study.info['figure8_names'][model_label]}")
        figures.append(fig)
    return figures


def verdict(study: Study) -> str:
    """Per model: Table 7's three settings beside the paper's, Figure 8's maximum load; real == masked checks."""
    table7, fig8, lines = study.tables["table7"], study.tables["figure8_max_load_per_layer"], []
    for model_label, g in table7.groupby("model", sort=False):
        g = g.set_index("setting")
        rt, ed, d = g.loc["Router-Tuning"], g.loc["Expert Drop"], g.loc["dense"]
        lines.append(
            f"Table 7, {model_label}: dense {d.avg:.1f}%; Expert Drop {ed.avg:.1f}% ({ed['diff']:+.1f} "
            f"[{ed.ci_low:+.1f}, {ed.ci_high:+.1f}]) skipping {ed['skipped share']:.1%} at {ed.speedup:.2f}x; "
            f"Router-Tuning {rt.avg:.1f}% ({rt['diff']:+.1f} [{rt.ci_low:+.1f}, {rt.ci_high:+.1f}]) skipping "
            f"{rt['skipped share']:.1%} at {rt.speedup:.2f}x (timing prompts: Expert Drop skips "
            f"{ed['skipped share (timing)']:.1%}, Router-Tuning {rt['skipped share (timing)']:.1%}). Paper "
            f"({d['paper model']}): dense {d['paper avg']}, Expert Drop {ed['paper avg']} ({ed['paper speedup']}x), "
            f"Router-Tuning {rt['paper avg']} ({rt['paper speedup']}x).")
        m8 = fig8[fig8.model == model_label][list(MAX_LOAD.values())]
        gate, router, drop = (m8[c] for c in MAX_LOAD.values())
        lines.append(f"Figure 8: most loaded expert (max over layers) {gate.max():.2f}x the mean at the gate -> "
                     f"{router.max():.2f}x after router filtering ({drop.max():.2f}x after Expert Drop); mean over "
                     f"layers {gate.mean():.2f}x -> {router.mean():.2f}x. Paper: {PAPER_FIGURE8['max_load_before']}x "
                     f"-> {PAPER_FIGURE8['max_load_after']}x.")
    for _, c in study.tables["real_vs_masked"].iterrows():
        lines.append(f"real == masked, {c.setting}: max |logit difference| {c.max_abs_logit_diff:.2e}, top-1 "
                     f"agreement {c.top1_agreement:.4f} over {c.tokens} tokens; executed {c.executed_real:.3f} (real) "
                     f"vs {c.executed_masked:.3f} (masked)")
    if study.profile != "paper":
        lines.append(f"({RANDOM}: accuracies are chance level by construction; only skipping, load, speed and real == "
                     "masked are evidence here.)")
    return "\n".join(lines)
