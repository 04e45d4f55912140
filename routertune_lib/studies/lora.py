"""Notebook 09: Router-Tuning together with LoRA (Table 8): dense, routers, LoRA, LoRA + routers."""

from __future__ import annotations

from dataclasses import asdict

import matplotlib.pyplot as plt
import pandas as pd

from ..evaluation import PAPER_TASKS, fidelity, task_average, task_prompts
from ..experiments import (load_base_model, measure_speedups, profile_train_config, routed_copy, router_record,
                           skipped_share, speedup_cells, tuned_adapter, tuned_routers)
from ..paper import PAPER_TABLE8
from ..plots import diff_bars, save_figure
from ..training import LoraSettings
from .protocol import (CAPACITY, Study, calibrate, ci_rows, mindskip_config, reference_for, resolved, shots_label,
                       timing_pool)

NAME = "09_lora"
SETTINGS = {  # evaluation/timing sizes and LoRA settings; model + tuning budget come from experiments.PROFILES
    "smoke": dict(tasks=["piqa", "boolq"], shots=0, limit=8, calib_per_layer=True, n_boot=1000, lora_lr=None,
                  lora=dict(r=4, alpha=8.0, dropout=0.05),
                  speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    # cpu: the tasks SmolLM2-135M is clearly above chance on, 200 docs, per-layer calibration, timing as notebook 02
    "cpu": dict(tasks=["arc_easy", "piqa"], shots=0, limit=200, calib_per_layer=True, n_boot=2000,
                lora_lr=None, lora=dict(r=8, alpha=16.0, dropout=0.05),
                speed=dict(batch_size=8, prompt_len=256, num_prompts=8, new_tokens=32, repeats=5)),
    # lr 1e-4 for the LoRA runs (the routers' 1e-5 is too small for adapters; 1e-4 is in the paper's router grid)
    "paper": dict(tasks=list(PAPER_TASKS), shots=None, limit=None, calib_per_layer=True, n_boot=2000, lora_lr=1e-4,
                  lora=dict(r=8, alpha=16.0, dropout=0.05),
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=128, repeats=5)),
}


def run(profile: str) -> Study:
    """Tune (cached) routers, LoRA alone and LoRA + routers; merge adapters, calibrate routed models to capacity 0.5,
    score and time all four models. Scoring is paired per document against cached reference outputs: the router and
    LoRA against the dense model, LoRA + routers against LoRA (its own unrouted base), so that KL measures what
    routing costs on top of each base. Writes ``table8`` (one row per setting, ours beside the paper's),
    ``table8_paper`` and ``lora_router_minus_lora`` (per metric: LoRA + routers against LoRA, and routing's KL on
    LoRA against routing's KL on the dense model)."""
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
    pool = timing_pool(tokenizer, S["tasks"], S["speed"])
    reference = reference_for(model, tokenizer, S)
    for name, r in tuning.items():
        print(f"{name:12s} {r['steps']} steps in {r['wall_time_s']:.0f} s; {r['trainable_parameters']:,} trainable "
              f"parameters; final loss {r['final_loss']:.3f}; training capacity {r['final_capacity']:.2f}")
    thresholds = {}
    with (routed_copy(model, paths["router"]) as router,
          routed_copy(model, adapter_path=tuned_adapter(paths["lora"])) as lora_model,  # routers of this run: inert
          routed_copy(model, paths["lora_router"], tuned_adapter(paths["lora_router"])) as lora_router):
        models = {"router": router, "lora": lora_model, "lora_router": lora_router}
        for name in ("router", "lora_router"):
            thresholds[name] = calibrate(models[name], calibration, CAPACITY, S["calib_per_layer"], tokenizer)
        bases = {"router": reference, "lora": reference, "lora_router": reference_for(lora_model, tokenizer, S)}
        fids = {name: fidelity(m, tokenizer, bases[name], n_boot=S["n_boot"]) for name, m in models.items()}
        speed = measure_speedups(model, models, pool, **S["speed"]).set_index("setting")
    study.info.update(num_hidden_layers=N, tuning=tuning)
    docs = {name: f.choice_frame() for name, f in fids.items()}
    docs = {"dense": docs["router"].assign(accuracy=docs["router"].ref_accuracy, kl=0.0), **docs}
    table = study.table("table8", _table8(docs, fids, speed, tuning, N, S["n_boot"]))
    study.table("table8_paper", pd.DataFrame([{"model": m, **p} for m, p in PAPER_TABLE8.items()]))
    study.table("lora_router_minus_lora", _lora_router_minus_lora(docs, S["n_boot"]))
    ci_width = (table.ci_high - table.ci_low)[1:]
    print(f"n per task: {S['limit']}; 95% CI width of the average difference: {ci_width.min():.1f}.."
          f"{ci_width.max():.1f} points")
    study.finish(router_config=asdict(router_config), train_configs={k: v.to_dict() for k, v in configs.items()},
                 capacity=CAPACITY, tuning=tuning, checkpoints={k: str(v) for k, v in paths.items()},
                 thresholds=thresholds, speed=speed.reset_index().to_dict(orient="records"),
                 eval_routing={k: f.routing for k, f in fids.items()}, lora_merged_before_eval_and_timing=True,
                 kl_reference={"router": "dense", "lora": "dense", "lora_router": "lora"})
    return study


def _table8(docs: dict, fids: dict, speed: pd.DataFrame, tuning: dict, N: int, n_boot: int) -> pd.DataFrame:
    """One row per setting: accuracy per task and averaged, its paired difference to dense (95% CI), the KL to the
    setting's base (dense for the router and LoRA, LoRA for LoRA + routers) with its CI, executed fraction, speed-up
    with its CI and FLOP fraction, tuning record; the paper's two models beside."""
    dense = docs["dense"]
    rows = []
    for name, d in docs.items():
        means = d.groupby(level="task", sort=False).accuracy.mean()
        diff = task_average(d.assign(x=100 * (d.accuracy - dense.accuracy)), "x", n_boot)
        kl = task_average(d, "kl", n_boot)
        sp = None if name == "dense" else speed.loc[name]
        rows.append({"setting": name, **(100 * means).to_dict(), "avg": 100 * means.mean(), "diff": diff["value"],
                     "ci_low": diff["ci_low"], "ci_high": diff["ci_high"], "kl": kl["value"],
                     "kl_ci_low": kl["ci_low"], "kl_ci_high": kl["ci_high"],
                     "kl to": {"dense": "", "lora_router": "lora"}.get(name, "dense"),
                     "executed": 1.0 if name == "dense" else fids[name].routing.get("overall", 1.0),
                     "skipped share": 0.0 if name == "dense" else skipped_share(fids[name].routing, N),
                     **speedup_cells(sp), "flop_fraction": 1.0 if sp is None else sp.flop_fraction,
                     "train capacity": None if name == "dense" else tuning[name]["final_capacity"],
                     "trainable": 0 if name == "dense" else tuning[name]["trainable_parameters"],
                     "tuning s": 0.0 if name == "dense" else tuning[name]["wall_time_s"]})
    ours = pd.DataFrame(rows)
    for m, p in PAPER_TABLE8.items():
        ours[f"avg (paper, {m})"] = [p[k] for k in docs]
        ours[f"diff (paper, {m})"] = [p[k] - p["dense"] for k in docs]
        ours[f"speedup (paper, {m})"] = [p.get(f"{k}_speedup", 1.0) for k in docs]
    return ours


def _lora_router_minus_lora(docs: dict, n_boot: int) -> pd.DataFrame:
    """Per task and averaged: LoRA + routers minus LoRA in accuracy (points; the paper's "routing costs nothing on
    top of LoRA"), and routing's KL on top of LoRA minus routing's KL on top of the dense model (KL(LoRA || LoRA +
    routers) − KL(dense || routers), nats; ``holds`` when routing on LoRA costs less), paired per document."""
    cells = [("accuracy", 100 * (docs["lora_router"].accuracy - docs["lora"].accuracy), True),
             ("KL to its base, LoRA + routers minus routers", docs["lora_router"].kl - docs["router"].kl, False)]
    return pd.DataFrame([r for metric, x, higher_better in cells
                         for r in ci_rows(x.to_frame("x"), "x", n_boot, metric, higher_better)])


def plot(study: Study):
    """Accuracy − dense per setting (ours with its paired CI, the paper's two models; labels: measured speed-up with
    its CI) and KL to each setting's base with its CI; saves table8_diff.png."""
    table, N = study.tables["table8"], study.info["num_hidden_layers"]
    g = table[table.setting != "dense"]
    labels = [f"{s}\n{v:.2f}x [{lo:.2f}, {hi:.2f}]" for s, v, lo, hi in
              zip(g.setting, g.speedup, g["speedup ci_low"], g["speedup ci_high"])]
    fig, (ax, axk) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    diff_bars(ax, labels, g, f"ours ({study.model_label}, {study.profile}, {', '.join(study.scored_tasks('table8'))})",
              {f"paper ({m}, 8 tasks)": g[f"diff (paper, {m})"] for m in PAPER_TABLE8})
    ax.set_xlabel("setting, measured end-to-end speed-up (LoRA merged, real skipping; 95% CI)")
    axk.bar(range(len(g)), g.kl, yerr=[g.kl - g.kl_ci_low, g.kl_ci_high - g.kl], capsize=4)
    axk.set_xticks(range(len(g)), [f"{s}\n(to {b})" for s, b in zip(g.setting, g["kl to"])])
    axk.set_ylabel("KL(base || setting), nats / token")
    axk.set_title("What each change costs its base (95% CI)", fontsize=9)
    fig.suptitle(f"Table 8: LoRA and Router-Tuning, capacity {CAPACITY}, {N // 2} of {N} layers routed")
    fig.tight_layout()
    save_figure(fig, study.out_dir, "table8_diff")
    return fig


def verdict(study: Study) -> str:
    """LoRA vs dense, routers on top of LoRA vs LoRA alone (paired CIs in accuracy and KL), speed-ups with CIs and
    executed fractions."""
    t, tuning = study.tables["table8"].set_index("setting"), study.info["tuning"]
    vs = study.tables["lora_router_minus_lora"]
    avg = vs[vs.task == "average"].set_index("metric")
    pa, pk = avg.loc["accuracy"], avg.loc["KL to its base, LoRA + routers minus routers"]
    fmt = lambda s: f"{t.loc[s, 'diff']:+.1f} [{t.loc[s, 'ci_low']:+.1f}, {t.loc[s, 'ci_high']:+.1f}]"
    sp = lambda s: f"{t.loc[s, 'speedup']:.2f}x [{t.loc[s, 'speedup ci_low']:.2f}, {t.loc[s, 'speedup ci_high']:.2f}]"
    sig = lambda lo, hi: "significant" if resolved(lo, hi) else "not significant"
    return "\n".join([
        f"Ours ({study.model_label}, {study.profile}, tasks {study.scored_tasks('table8')}): dense "
        f"{t.loc['dense', 'avg']:.1f}%; Router-Tuning {fmt('router')} ({sp('router')}), LoRA {fmt('lora')} "
        f"({sp('lora')}), LoRA + Router-Tuning {fmt('lora_router')} ({sp('lora_router')}) points vs dense. Paper: "
        + "; ".join(f"{m} RT {p['router'] - p['dense']:+.1f} ({p['router_speedup']:.2f}x), LoRA "
                    f"{p['lora'] - p['dense']:+.1f}, LoRA+RT {p['lora_router'] - p['dense']:+.1f} "
                    f"({p['lora_router_speedup']:.2f}x)" for m, p in PAPER_TABLE8.items()),
        f"LoRA {'improves on' if t.loc['lora', 'diff'] > 0 else 'does NOT improve on'} dense here "
        f"({sig(t.loc['lora', 'ci_low'], t.loc['lora', 'ci_high'])} at 95%; paper: +1.4 / +0.8 points); it moves the "
        f"model by KL {t.loc['lora', 'kl']:.3f} [{t.loc['lora', 'kl_ci_low']:.3f}, {t.loc['lora', 'kl_ci_high']:.3f}].",
        f"Adding routers to LoRA changes accuracy by {pa['diff']:+.1f} [{pa.ci_low:+.1f}, {pa.ci_high:+.1f}] points vs "
        f"LoRA alone ({sig(pa.ci_low, pa.ci_high)} at 95%; paper: -0.1 / +0.1). Routing costs KL "
        f"{t.loc['lora_router', 'kl']:.3f} on top of LoRA and {t.loc['router', 'kl']:.3f} on top of the dense model: "
        f"difference {pk['diff']:+.3f} [{pk.ci_low:+.3f}, {pk.ci_high:+.3f}] ({pk.verdict}: 'routing costs less on "
        "top of LoRA').",
        f"Executed fraction during evaluation: router {t.loc['router', 'executed']:.2f}, LoRA + RT "
        f"{t.loc['lora_router', 'executed']:.2f} (target {CAPACITY}); training capacity (threshold 0.5): router "
        f"{tuning['router']['final_capacity']:.2f}, LoRA + RT {tuning['lora_router']['final_capacity']:.2f}.",
    ])
