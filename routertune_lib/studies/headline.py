"""Notebook 11: the headline comparison in paired fidelity metrics (issue 14). The tuned MindSkip router (attention,
sequence level, half the layers, capacity 0.5, i.e. about 25% of all attention skipped) against a random router and
static attention drop at the same executed fraction, each scored against the dense model on the same documents:
KL(dense || model) over the scored continuation tokens, the change of the gold continuation's log-likelihood and
agreement of the chosen answer; and on held-out task text the perplexity ratio and per-token KL."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..baselines import attach_static_drop, least_important, module_importance
from ..evaluation import HELDOUT, bootstrap_ci, closer_verdict, fidelity, reference_outputs, task_prompts
from ..experiments import (conversation_batches, load_base_model, profile_train_config, randomize_routers,
                           skipped_share, tuned_routers)
from ..plots import save_figure
from ..routing import RouterConfig, attach_routers, load_routers
from .protocol import CALIB_MAX_LENGTH, CAPACITY, Study, calibrate, mindskip_config

NAME = "11_headline_fidelity"
SETTINGS = {  # tasks where the model is above chance (results/task_selection), 0-shot; held-out 10-shot task text
    "smoke": dict(tasks=["arc_easy", "piqa"], limit=8, heldout_texts=4, heldout_max_length=64, n_boot=1000),
    "cpu": dict(tasks=["arc_easy", "piqa"], limit=200, heldout_texts=48, heldout_max_length=512, n_boot=2000),
    "paper": dict(tasks=["arc_easy", "piqa", "hellaswag", "winogrande"], limit=None, heldout_texts=512,
                  heldout_max_length=2048, n_boot=2000),
}
METRICS = ("kl", "delta_loglik", "agreement")  # per multiple-choice task; held-out text: kl, ppl_ratio


def run(profile: str) -> Study:
    """Dense reference once; then per setting one pass: the tuned router and a random router (per-layer calibration
    to capacity 0.5, and the tuned router with one global threshold), static attention drop of the k and k+1 least
    important routed layers (bracketing the same skipped share). Writes ``fidelity`` (one row per setting x task x
    metric), ``paired`` (tuned router minus each other setting, per-document paired bootstrap, with a verdict) and
    ``run.json``."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    model, tokenizer = load_base_model(P["model"])
    N = model.config.num_hidden_layers
    n = P["calib_samples"]
    calibration = task_prompts(S["tasks"], n)  # 0-shot contexts from the tasks' training splits
    heldout = task_prompts(S["tasks"], S["heldout_texts"], seed=2, num_fewshot=10)  # unseen, long task text
    print(f"profile {profile}: model {study.model_label}; tasks {S['tasks']} 0-shot, limit {S['limit']} docs each; "
          f"{len(heldout)} held-out 10-shot texts (<= {S['heldout_max_length']} tokens); calibration {n} prompts")
    ref = reference_outputs(model, tokenizer, S["tasks"], heldout, num_fewshot=0, limit=S["limit"],
                            text_max_length=S["heldout_max_length"])
    config = mindskip_config(N)
    layers = config.resolve_layers(N)
    path = tuned_routers(P["model"], config, profile_train_config(profile), num_samples=P["train_samples"],
                         model=model, tokenizer=tokenizer)
    importance = module_importance(model, conversation_batches(calibration, tokenizer, CALIB_MAX_LENGTH,
                                                               device=model.device))["attn"]
    k = int(len(layers) * (1 - CAPACITY))  # 7 of 15: static drop brackets the routers' 7.5 layers with k and k + 1

    settings = {}
    tuned = load_routers(copy.deepcopy(model), path)
    random = attach_routers(copy.deepcopy(model), RouterConfig(target="attn", level="sequence", layers=layers))
    randomize_routers(random, seed=0)
    for name, routed, per_layer in [("router, per-layer threshold", tuned, True),
                                    ("random router, per-layer threshold", random, True),
                                    ("router, global threshold", tuned, False)]:
        calibrate(routed, calibration, CAPACITY, per_layer, tokenizer)
        settings[name] = fidelity(routed, tokenizer, ref, n_boot=S["n_boot"])
    for drop in (k, k + 1):
        static = attach_static_drop(copy.deepcopy(model), "attn", least_important(importance, drop, layers))
        settings[f"static attention drop, {drop} layers"] = fidelity(static, tokenizer, ref, n_boot=S["n_boot"])
        del static

    rows = []
    for name, fid in settings.items():
        for task, t in fid.tasks.items():
            skipped = skipped_share(t["routing"], N)
            for metric, v in t["metrics"].items():
                if "ci_low" in v:
                    rows.append({"setting": name, "task": task, "metric": metric, "value": v["value"],
                                 "ci_low": v["ci_low"], "ci_high": v["ci_high"], "n": v["n"],
                                 "attention skipped (all layers)": skipped})
    study.table("fidelity", pd.DataFrame(rows), floatfmt=".4f")
    study.table("paired", _paired(settings, "router, per-layer threshold", S["n_boot"]), floatfmt=".4f")
    study.info.update(num_hidden_layers=N, routed_layers=layers, static_k=k)
    study.finish(router_checkpoint=str(path), routed_layers=layers, reference=ref.config["model"])
    return study


def _paired(settings: dict, base: str, n_boot: int) -> pd.DataFrame:
    """``base`` minus each other setting, per task and metric: the mean of per-document differences with a paired
    bootstrap CI; pooled over the multiple-choice tasks' documents too. Verdict: for KL lower is closer to dense, for
    Δ log-likelihood and agreement higher is."""
    rows = []
    recs = {name: fid.records_dataframe() for name, fid in settings.items()}
    for other in settings:
        if other == base:
            continue
        a, b = recs[base], recs[other]
        for task in [*a.task.unique(), "multiple choice (pooled)"]:
            sel = (a.task != HELDOUT) if task.startswith("multiple choice") else (a.task == task)
            for metric in ("kl",) if task == HELDOUT else METRICS:
                x = (a.loc[sel, metric].to_numpy() - b.loc[sel, metric].to_numpy())
                if task == HELDOUT:  # token-weighted, as the held-out KL itself
                    w = a.loc[sel, "tokens"].to_numpy().astype(float)
                    ci = bootstrap_ci(np.stack([x * w, w], -1), n_boot, 0, lambda r: r[..., 0].sum(1) / r[..., 1].sum(1))
                else:
                    ci = bootstrap_ci(x, n_boot, 0)
                rows.append({"router minus": other, "task": task, "metric": metric, "diff": ci["value"],
                             "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "n": ci["n"],
                             "router closer to dense": closer_verdict(ci["ci_low"], ci["ci_high"], metric != "kl")})
    return pd.DataFrame(rows)


def figure(study: Study) -> None:
    """KL(dense || model) with its 95% CI per setting, one panel per task (x: attention skipped over all layers)."""
    df = study.tables["fidelity"]
    df = df[df.metric == "kl"]
    tasks = list(df.task.unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        d = df[df.task == task]
        for _, r in d.iterrows():
            ax.errorbar(r["attention skipped (all layers)"], r.value, yerr=[[r.value - r.ci_low], [r.ci_high - r.value]],
                        fmt="o", capsize=3, label=r.setting)
        ax.set_title(task)
        ax.set_xlabel("attention executions skipped (all layers)")
        ax.set_ylabel("KL(dense || model), nats / token")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{study.model_label}: fidelity to the dense model at the same skipped share (95% CI)")
    save_figure(fig, study.out_dir, "headline_fidelity")


def verdict(study: Study) -> str:
    """One line per comparison on the pooled multiple-choice KL and the held-out KL."""
    p = study.tables["paired"]
    p = p[(p.metric == "kl") & p.task.isin(["multiple choice (pooled)", HELDOUT])]
    return "\n".join(f"router (per-layer) minus {r['router minus']}, {r.task}: KL {r['diff']:+.3g} "
                     f"[{r.ci_low:+.3g}, {r.ci_high:+.3g}] -> router closer to dense: {r['router closer to dense']}"
                     for _, r in p.iterrows())
