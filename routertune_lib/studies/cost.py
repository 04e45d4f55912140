"""Notebook 04: the training cost of Router-Tuning against LoRA and full fine-tuning on the same data and steps
(Table 4), measured with :mod:`routertune_lib.training_cost` (each method in its own process)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..paper import PAPER_TABLE4
from ..plots import save_figure
from ..training_cost import CostConfig, committed_benchmark, cost_table, measure_methods
from .protocol import Study

NAME = "04_training_cost"
SETTINGS = {  # data size and steps; model, lr, batch sizes, length and precision come from experiments.PROFILES
    "smoke": dict(samples=8, held_out=4, steps_other=0),
    "cpu": dict(samples=128, held_out=32, steps_other=0),
    # full fine-tuning of an 8B model: one conversation of 2048 tokens per forward (gradient accumulation to 64)
    "paper": dict(samples=1000, held_out=64, steps_other=3, micro_batch=1),
}
LABELS = {"routers": "Router-Tuning", "lora": "LoRA", "full": "full fine-tuning"}
COLUMNS = ["method", "steps_run", "steps_total", "epoch_time", "tokens_per_s", "wall_s_per_step", "wall_s_epoch",
           "time_vs_routers", "trainable", "trainable_pct", "peak_memory_gib", "peak_memory_kind", "final_loss"]


def cost_config(P: dict, S: dict) -> CostConfig:
    """The profile's model and tuning budget (``P``) with the study's data size and steps (``S``, which wins)."""
    return CostConfig(**{**dict(model=P["model"], max_length=P["max_length"], global_batch=P["global_batch"],
                                micro_batch=P["micro_batch"], num_layers=None, lr=P["lr"],
                                mixed_precision=P["mixed_precision"]), **S})


def run(profile: str) -> Study:
    """Measure the three methods; writes ``table4`` (one row per method) and ``table4_paper``; keeps the committed
    larger benchmark run (``results/training_cost/``) in ``info["benchmark"]`` when there is one."""
    study = Study.start(NAME, profile, SETTINGS)
    config = cost_config(study.profile_settings, study.settings)
    print(f"profile {profile}: {config}")
    rows = measure_methods(config)
    ours = cost_table(rows)
    study.table("table4", ours[COLUMNS].assign(method=ours.method.map(LABELS)), floatfmt=".4g")
    rt = ours.set_index("method").loc["routers"]
    print(f"Router-Tuning: {len(rt.layers)} routed layers {rt.layers}; executed fraction {rt.capacity_trained:.2f} "
          f"in the last training step, {rt.capacity_calibrated:.3f} after calibrating to {config.capacity} on "
          f"{config.held_out} held-out conversations, {rt.capacity_held_out:.3f} on another {config.held_out}")
    study.table("table4_paper", pd.DataFrame([{"method": k, "training cost (paper)": v}
                                              for k, v in PAPER_TABLE4.items()]))
    bench = committed_benchmark(study.profile_settings["model"] or "smollm2-135m")
    study.info.update(config=config, costs=ours, benchmark=bench)
    study.finish(config=config.to_dict(), rows=rows,
                 committed_benchmark=None if bench is None else {"command": bench["command"],
                                                                 "config": bench["config"]})
    return study


def benchmark_table(study: Study) -> pd.DataFrame | None:
    """The committed benchmark run's table in Table 4's columns, or ``None`` (printing where it is missing)."""
    bench = study.info["benchmark"]
    if bench is None:
        print(f"no committed benchmark run for {study.profile_settings['model']} in results/training_cost/")
        return None
    print(f"Committed benchmark run (results/training_cost/, wall time {bench['wall_time_s'] / 60:.0f} min): "
          f"`{bench['command']}`")
    return bench["table"][COLUMNS[:-1]].assign(method=bench["table"].method.map(LABELS))


def plot(study: Study):
    """Wall time per step and peak memory per method, this run beside the committed benchmark; table4_cost.png."""
    config, ours, bench = study.info["config"], study.info["costs"], study.info["benchmark"]
    runs = {f"this run ({study.profile}: {config.global_batch} conv. x length {config.max_length} per step)": ours}
    if bench is not None:
        c = bench["config"]
        runs[f"committed benchmark ({c['global_batch']} conv. x length {c['max_length']} per step)"] = bench["table"]
    routers = ours.set_index("method").loc["routers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x, w = np.arange(len(LABELS)), 0.8 / len(runs)
    for i, (name, df) in enumerate(runs.items()):
        d = df.set_index("method").reindex(list(LABELS))
        axes[0].bar(x + (i - (len(runs) - 1) / 2) * w, d.wall_s_per_step, w, label=name)
        axes[1].bar(x + (i - (len(runs) - 1) / 2) * w, d.peak_memory_gib, w, label=name)
    for ax, col, ylabel in [(axes[0], "wall_s_per_step", "wall time per optimizer step (s)"),
                            (axes[1], "peak_memory_gib",
                             f"peak memory (GiB, {routers.peak_memory_kind.replace('_', ' ')})")]:
        ax.axhline(routers[col], color="black", ls="--", lw=1, label="Router-Tuning, this run")
        ax.set_xticks(x, list(LABELS.values()))
        ax.set_xlabel("method (same data, batches and steps)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"Table 4: training cost, {study.model_label} ({study.profile})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, study.out_dir, "table4_cost")
    return fig


def verdict(study: Study) -> str:
    """Trainable parameters, time and memory relative to Router-Tuning, and whether it is the cheapest."""
    config, o = study.info["config"], study.info["costs"].set_index("method")
    cheapest = o.wall_s_epoch.idxmin() == "routers" and o.peak_memory_gib.idxmin() == "routers"
    return "\n".join([
        f"Ours ({study.model_label}, {study.profile}, {config.steps_total} steps of {config.global_batch} "
        f"conversations at length {config.max_length}): Router-Tuning trains {int(o.trainable['routers']):,} "
        f"parameters ({o.trainable_pct['routers']:.4f}%), LoRA {int(o.trainable['lora']):,} "
        f"({o.trainable_pct['lora']:.2f}%), full fine-tuning {int(o.trainable['full']):,} (100%).",
        f"Time per epoch relative to Router-Tuning: LoRA {o.time_vs_routers['lora']:.2f}x, full fine-tuning "
        f"{o.time_vs_routers['full']:.2f}x; peak memory: Router-Tuning {o.peak_memory_gib['routers']:.2f} GiB, LoRA "
        f"{o.peak_memory_gib['lora']:.2f} GiB, full {o.peak_memory_gib['full']:.2f} GiB.",
        f"Router-Tuning {'is' if cheapest else 'is NOT'} the cheapest method in both time and memory here (the "
        f"paper's claim: it is); the paper's gap (15 min vs 36 h for DLO, ~140x) is far larger than ours: the routers' "
        f"gradient still needs the backward pass through every layer above the first routed one; what Router-Tuning "
        f"saves is the backbone's weight gradients and optimizer state.",
    ])
