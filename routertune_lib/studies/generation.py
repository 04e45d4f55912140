"""Notebook 03: Router-Tuning vs static attention drop on a generative exact-match task (Figure 3)."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..baselines import attach_static_drop, least_important, module_importance
from ..evaluation import bootstrap_ci, closer_verdict, compare, evaluate, fidelity, reference_outputs, task_prompts
from ..experiments import (conversation_batches, load_base_model, measure_speedups, overall_skip,
                           profile_train_config, routed_copy, router_record, speedup_cells, tuned_routers)
from ..paper import PAPER_FIGURE3
from ..plots import baseline, ci_yerr, save_figure
from ..routing import load_routers
from .protocol import CALIB_MAX_LENGTH, Study, calibrate, mindskip_config, timing_pool

NAME = "03_generation_vs_attention_drop"
SETTINGS = {  # task, evaluation and timing sizes; model + tuning budget come from experiments.PROFILES (shared)
    "smoke": dict(task="arithmetic_plus", shots=2, limit=8, calib_per_layer=True, n_boot=1000,
                  speed=dict(batch_size=2, prompt_len=16, num_prompts=2, new_tokens=4, repeats=1)),
    # cpu: 300 docs (exact match and the teacher-forced fidelity pass), per-layer calibration (notebooks 11 and 12),
    # timing 5 interleaved rounds of batch 8 x 256-token few-shot task prompts, 32 new tokens (as notebook 02)
    "cpu": dict(task="arithmetic_plus", shots=5, limit=300, calib_per_layer=True, n_boot=2000,
                speed=dict(batch_size=8, prompt_len=256, num_prompts=8, new_tokens=32, repeats=5)),
    "paper": dict(task="gsm8k", shots=5, limit=None, calib_per_layer=True, n_boot=2000,
                  speed=dict(batch_size=32, prompt_len=512, num_prompts=64, new_tokens=256, repeats=5)),
}
SKIPS = [0.125, 0.25]  # share of all layers' attention skipped (Figure 3's two points)
LABELS = {"attn_drop": "static attention drop (LLM-Drop)", "router": "Router-Tuning"}


def run(profile: str) -> Study:
    """Dense, the cached attention router calibrated to 12.5% / 25% of all attention skipped and the static drop of
    as much attention: exact match (paired CI vs dense), fidelity to dense on the gold answers (teacher-forced KL and
    Δ log-likelihood, one pass against the dense model's cached outputs), skipped share, speed-up with its CI and
    executed FLOP fraction. Writes ``figure3`` (dense + two rows per skip level) and ``figure3_router_minus_drop``
    (router minus static drop per skip level and metric, with a verdict)."""
    study = Study.start(NAME, profile, SETTINGS)
    P, S = study.profile_settings, study.settings
    task = S["task"]
    print(f"profile {profile}: model {study.model_label}; task {task} {S['shots']}-shot, limit {S['limit']} docs; "
          f"calibration {P['calib_samples']} unlabelled {S['shots']}-shot prompts "
          f"({'per layer' if S['calib_per_layer'] else 'one global threshold'}); speed {S['speed']}")
    model, tokenizer = load_base_model(P["model"])
    N = model.config.num_hidden_layers
    train_config = profile_train_config(profile)
    router_config = mindskip_config(N)
    path = tuned_routers(P["model"], router_config, train_config, num_samples=P["train_samples"], model=model,
                         tokenizer=tokenizer)
    layers = router_config.resolve_layers(N)
    calibration = task_prompts(task, P["calib_samples"], num_fewshot=S["shots"])  # unlabelled, eval format
    importance = module_importance(model, conversation_batches(calibration, tokenizer, CALIB_MAX_LENGTH,
                                                               device=model.device))
    pool = timing_pool(tokenizer, [task], S["speed"])
    evaluate_ = lambda m: evaluate(m, tokenizer, [task], num_fewshot=S["shots"], limit=S["limit"])
    reference = reference_outputs(model, tokenizer, [task], num_fewshot=S["shots"], limit=S["limit"])
    results, fids = {("dense", 0.0): evaluate_(model)}, {}
    dense = results["dense", 0.0].tasks[task]
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
            for method, m in (("router", routed), ("attn_drop", static)):
                results[method, skip] = evaluate_(m)
                fids[method, skip] = fidelity(m, tokenizer, reference, n_boot=S["n_boot"])
            speed[skip] = measure_speedups(model, {"router": routed, "attn_drop": static}, pool,
                                           **S["speed"]).set_index("setting")
        print(f"skip {skip:.1%}: router capacity {capacity:.3f}, measured skipped share "
              f"{overall_skip(results['router', skip], N):.3f}; attention drop of layers {dropped[skip]} "
              f"({len(dropped[skip]) / N:.3f})")
    del routed
    study.info.update(num_hidden_layers=N, dense_n=dense.n,
                      layers_by_skip={s: results["router", s].routing["layers"] for s in SKIPS}, dropped=dropped)
    table = study.table("figure3", _figure3(results, fids, speed, dropped, task, N, len(layers)))
    study.table("figure3_router_minus_drop", _router_minus_drop(results, fids, task, S["n_boot"]))
    w, wk = (table.ci_high - table.ci_low)[1:], (table.kl_ci_high - table.kl_ci_low)[1:]
    print(f"n = {dense.n} docs; 95% CI width of the exact-match difference to dense: {w.min():.1f}..{w.max():.1f} "
          f"points, of the KL: {wk.min():.3f}..{wk.max():.3f} nats")
    study.finish(train_config=train_config.to_dict(), router_config=router_config, router_checkpoint=str(path),
                 router_record=router_record(path), routed_layers=layers, skips=SKIPS, thresholds=thresholds,
                 dropped_layers=dropped,
                 speed={str(k): v.reset_index().to_dict("records") for k, v in speed.items()},
                 eval_routing={f"{m}_{s}": e.routing for (m, s), e in results.items()})
    return study


def _figure3(results: dict, fids: dict, speed: dict, dropped: dict, task: str, N: int, n_routed: int) -> pd.DataFrame:
    dense = results["dense", 0.0]
    rows = []
    for (method, skip), e in results.items():
        d = compare(dense, e)["tasks"][task] if method != "dense" else dict(diff=0.0, ci_low=0.0, ci_high=0.0)
        sp = speed[skip].loc[method] if method != "dense" else None
        f = fids[method, skip].tasks[task]["metrics"] if method != "dense" else None
        kl, dll = ({"value": 0.0, "ci_low": 0.0, "ci_high": 0.0},) * 2 if f is None else (f["kl"], f["delta_loglik"])
        rows.append({"method": method, "target skip": skip,
                     "capacity": 1 - skip * N / n_routed if method == "router" else None,
                     "dropped layers": len(dropped[skip]) if method == "attn_drop" else 0,
                     "exact match": 100 * e.tasks[task].score, "diff": 100 * d["diff"], "ci_low": 100 * d["ci_low"],
                     "ci_high": 100 * d["ci_high"], "exact match (paper)": PAPER_FIGURE3[method].get(skip),
                     "kl": kl["value"], "kl_ci_low": kl["ci_low"], "kl_ci_high": kl["ci_high"],
                     "delta_loglik": dll["value"], "delta_loglik ci_low": dll["ci_low"],
                     "delta_loglik ci_high": dll["ci_high"],
                     "skipped share (generation)": overall_skip(e, N),
                     "skipped share (timing prompts)": 0.0 if sp is None else sp.skipped_share,
                     **speedup_cells(sp, "speed-up"), "flop_fraction": 1.0 if sp is None else sp.flop_fraction,
                     "kv ratio": 1.0 if sp is None else sp.kv_ratio,
                     "eval generation s": e.tasks[task].seconds, "eval cached": e.tasks[task].cached})
    table = pd.DataFrame(rows)
    table["eval speed-up"] = table["eval generation s"].iloc[0] / table["eval generation s"]
    return table


def _router_minus_drop(results: dict, fids: dict, task: str, n_boot: int) -> pd.DataFrame:
    """Per skip level and metric (exact match in points, KL to dense and gold-answer Δ log-likelihood in nats):
    router minus static drop on the same docs with its paired 95% CI, and whether the router is closer to dense
    (``holds``), farther (``reversed``) or the CI says neither (``unresolved``)."""
    rows = []
    for skip in SKIPS:
        em = compare(results["attn_drop", skip], results["router", skip], n_boot=n_boot)["tasks"][task]
        per_doc = {m: pd.DataFrame(fids[m, skip].tasks[task]["records"]).set_index("doc_id") for m in LABELS}
        cells = [("exact match", 100.0, True, em)]
        for metric, col, higher_better in (("KL(dense || model)", "kl", False),
                                           ("Δ gold log-likelihood", "delta_loglik", True)):
            d = per_doc["router"][col] - per_doc["attn_drop"][col]
            ci = bootstrap_ci(d.to_numpy(), n_boot)
            cells.append((metric, 1.0, higher_better, {**ci, "diff": ci["value"]}))
        for metric, scale, higher_better, c in cells:
            lo, hi = scale * c["ci_low"], scale * c["ci_high"]
            rows.append({"target skip": skip, "metric": metric, "n": c["n"], "diff": scale * c["diff"],
                         "ci_low": lo, "ci_high": hi, "verdict": closer_verdict(lo, hi, higher_better),
                         "diff (paper)": (PAPER_FIGURE3["router"][skip] - PAPER_FIGURE3["attn_drop"][skip]
                                          if metric == "exact match" else None)})
    return pd.DataFrame(rows)


def plot(study: Study):
    """Exact match (paired 95% CI vs dense) and KL(dense || model) on the gold answers (95% CI) against the measured
    speed-up (with its CI), one marker per method, labelled with skip level and executed FLOP fraction; the paper's
    chart beside; saves figure3.png."""
    table, S = study.tables["figure3"], study.settings
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    for (m, label), marker in zip(LABELS.items(), "s^"):
        g = table[table.method == m]
        xerr = [g["speed-up"] - g["speed-up ci_low"], g["speed-up ci_high"] - g["speed-up"]]
        for ax, y, yerr in ((axes[0], g["exact match"], ci_yerr(g)),
                            (axes[1], g.kl, [g.kl - g.kl_ci_low, g.kl_ci_high - g.kl])):
            ax.errorbar(g["speed-up"], y, xerr=xerr, yerr=yerr, fmt=marker, capsize=3, label=label)
            for xi, yi, s, f in zip(g["speed-up"], y, g["target skip"], g.flop_fraction):
                ax.annotate(f"{s:.1%}, FLOPs {f:.2f}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    dense = table.iloc[0]
    axes[0].scatter([1.0], [dense["exact match"]], marker="*", s=120, color="black", label="dense", zorder=5)
    axes[1].scatter([1.0], [0.0], marker="*", s=120, color="black", label="dense", zorder=5)
    x, w = np.arange(len(SKIPS)), 0.35
    for i, (m, label) in enumerate(LABELS.items()):
        axes[2].bar(x + (i - 0.5) * w, [PAPER_FIGURE3[m][s] for s in SKIPS], w, label=label)
    baseline(axes[2], PAPER_FIGURE3["dense"][0.0], "dense")
    axes[2].set_xticks(x, [f"{s:.1%} skipped" for s in SKIPS])
    axes[2].set_xlabel("share of all layers' attention skipped")
    for ax in axes[:2]:
        ax.set_xlabel("end-to-end generation speed-up over dense (x, real skipping, 95% CI)")
    axes[0].set_ylabel("exact match (%)\n(error bar: paired 95% CI of the difference to dense)")
    axes[1].set_ylabel("KL(dense || model) on the gold answers,\nnats / token (mean per doc, 95% CI)")
    axes[2].set_ylabel("exact match (%)")
    titles = [f"ours: {study.model_label}, {S['task']} {S['shots']}-shot, {study.info['dense_n']} docs",
              f"ours: fidelity to dense ({study.profile})", "paper: Llama-3-8B, GSM8K 5-shot (chart)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, study.out_dir, "figure3")
    return fig


def verdict(study: Study) -> str:
    """Router vs static drop at each skip level, per metric (paired CI and verdict), and whether the claim holds."""
    S, task = study.settings, study.settings["task"]
    t = study.tables["figure3"].set_index(["method", "target skip"])
    vs = study.tables["figure3_router_minus_drop"]
    lines = [f"Dense: {t.loc[('dense', 0.0), 'exact match']:.1f}% exact match ({study.model_label}, {task} "
             f"{S['shots']}-shot, n={study.info['dense_n']}); paper (Llama-3-8B, GSM8K): "
             f"{PAPER_FIGURE3['dense'][0.0]}%."]
    for skip in SKIPS:
        rt, dr = t.loc[("router", skip)], t.loc[("attn_drop", skip)]
        cells = "; ".join(f"{r.metric} {r['diff']:+.3g} [{r.ci_low:+.3g}, {r.ci_high:+.3g}] ({r.verdict})"
                          for _, r in vs[vs["target skip"] == skip].iterrows())
        paper = vs[(vs["target skip"] == skip) & (vs.metric == "exact match")]["diff (paper)"].iloc[0]
        lines.append(f"{skip:.1%} of attention skipped (measured: router {rt['skipped share (generation)']:.3f}, drop "
                     f"{dr['skipped share (generation)']:.3f}): exact match router {rt['exact match']:.1f}% vs drop "
                     f"{dr['exact match']:.1f}%; router minus drop: {cells}; paper {paper:+.1f} points. Speed-up "
                     f"router {rt['speed-up']:.2f}x [{rt['speed-up ci_low']:.2f}, {rt['speed-up ci_high']:.2f}], drop "
                     f"{dr['speed-up']:.2f}x [{dr['speed-up ci_low']:.2f}, {dr['speed-up ci_high']:.2f}]; FLOP "
                     f"fraction {rt.flop_fraction:.3f} vs {dr.flop_fraction:.3f}.")
    for metric, g in vs.groupby("metric", sort=False):
        verdicts = set(g.verdict)
        lines.append(f"Claim (router closer to dense than static drop at both skip levels) in {metric}: "
                     + ("holds" if verdicts == {"holds"} else "reversed" if verdicts == {"reversed"}
                        else f"mixed or unresolved ({', '.join(g.verdict)})") + ".")
    for skip in SKIPS:  # how much of the routing is per sequence rather than per layer
        f = study.info["layers_by_skip"][skip]
        lines.append(f"{skip:.1%}: routed layers always skipped {sorted(i for i, v in f.items() if v == 0)}, skipped "
                     f"by part of the sequences {sorted(i for i, v in f.items() if 0 < v < 1)}; static drop "
                     f"{study.info['dropped'][skip]}.")
    return "\n".join(lines)
