"""The tables and quoted numbers of ``results/README.md``, generated from the result files so that they cannot drift.

The README holds blocks ``<!-- table:NAME -->`` ... ``<!-- /table -->`` and inline numbers ``<!-- value:NAME -->`` ...
``<!-- /value -->``. :func:`render` rewrites what lies between the markers with :data:`TABLES` / :data:`VALUES`
``[NAME]`` (a table block also names the files it was read from) and leaves everything else as it is.

    python -m routertune_lib.results_readme           # rewrite results/README.md
    python -m routertune_lib.results_readme --check   # exit 1 with a diff when it differs from the files (tests)
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .paper import PAPER_FIGURE2
from .reporting import write_atomic

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- (table|value):([\w.-]+) -->(.*?)<!-- /\1 -->", re.S)


class Results:
    """Reads result files under ``root`` (the repository root) and remembers which ones were read."""

    def __init__(self, root: Path):
        self.root, self.sources = Path(root), []

    def _path(self, rel: str) -> Path:
        path = self.root / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path}: result file missing; re-run what writes it (see results/README.md)")
        if rel not in self.sources:
            self.sources.append(rel)
        return path

    def csv(self, rel: str) -> pd.DataFrame:
        return pd.read_csv(self._path(rel))

    def json(self, rel: str) -> dict:
        return json.loads(self._path(rel).read_text())


# ---- formatting -------------------------------------------------------------------------------------------------


def num(x, digits: int = 1, sign: bool = False) -> str:
    """``x`` with ``digits`` decimals (``+`` for positives when ``sign``); an em dash for missing values."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def ci(diff, low, high, digits: int = 1) -> str:
    """``+0.3 [-3.6, +4.2]``: a difference with its 95% CI."""
    return f"{num(diff, digits, True)} [{num(low, digits, True)}, {num(high, digits, True)}]"


def times(x, digits: int = 2) -> str:
    return f"{num(x, digits)}x"


def seconds(x) -> str:
    return "—" if x is None else f"{x:,.0f} s"


def verdict(low, high) -> str:
    """Whether a paired difference is resolved at 95%: ``lower`` / ``higher`` when the CI excludes 0."""
    return "lower" if high < 0 else "higher" if low > 0 else "unresolved"


def md(rows: list[dict], right: tuple[str, ...] = ()) -> str:
    """A Markdown table of ``rows`` (dicts of already formatted cells); ``right`` lists right-aligned columns."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in right else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ---- tables -----------------------------------------------------------------------------------------------------

NOTEBOOKS = ("00_quickstart", "01_granularity", "02_speed_accuracy", "03_generation_vs_attention_drop",
             "04_training_cost", "05_num_layers", "06_across_models", "07_training_data", "08_moe", "09_lora",
             "10_router_dynamics", "11_headline_fidelity", "12_router_ablation")
METHOD_NAMES = {"routers": "Router-Tuning", "lora": "LoRA", "full": "full fine-tuning"}
MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}
TASK_NAMES = {"boolq": "BoolQ", "rte": "RTE", "openbookqa": "OpenBookQA", "piqa": "PIQA", "mmlu": "MMLU",
              "winogrande": "WinoGrande", "hellaswag": "HellaSwag", "arc_challenge": "ARC-Challenge",
              "arc_easy": "ARC-Easy"}


def _record(r: Results, rel: str) -> dict:
    """A run record: ``wall_time_s`` and the provenance ``run`` (old records lack the git state)."""
    d = r.json(rel)
    run = d.get("run", {})
    dirty = run.get("git_dirty")
    return {"wall time": seconds(d.get("wall_time_s")),
            "commit": (run.get("git_commit") or "—")[:7],
            "uncommitted changes": "not recorded" if dirty is None else "yes" if dirty else "no",
            "torch threads": run.get("torch_threads", "—"),
            "CPU": run.get("cpu_model") or "not recorded"}


def table_runs(r: Results) -> str:
    rows = [{"run": f"`{nb}`", **_record(r, f"results/{nb}/cpu/run.json")} for nb in NOTEBOOKS]
    rows += [{"run": f"benchmark: {name}", **_record(r, path)} for name, path in BENCHMARKS.items()]
    return md(rows, right=("wall time", "torch threads"))


REPRODUCE = "notebooks/executed/cpu/reproduce.json"  # routertune_lib.reproduce's record of each invocation


def _reproduce_notebooks(r: Results) -> list[tuple[dict, dict]]:
    """``(invocation, notebook entry)`` of every notebook tried (not skipped) by the run of ``make reproduce`` (cpu)
    from an empty cache (no tuned routers, no cached evaluations): the invocations from the last one that started on
    an empty cache on, the continuation of one run split where it was stopped and started again (each invocation
    skips the notebooks an earlier one finished)."""
    runs = r.json(REPRODUCE)["runs"]
    empty = [i for i, x in enumerate(runs) if not any(x["cache_files"].values())]
    if not empty:
        raise ValueError(f"{REPRODUCE}: no invocation started on an empty cache; run make reproduce with an empty "
                         "ROUTERTUNE_CACHE")
    return [(x, nb) for x in runs[empty[-1]:] for nb in x["notebooks"] if nb["status"] != "skipped"]


def table_reproduce(r: Results) -> str:
    """Per notebook of the run from an empty cache: the invocation that ran it, its wall time, and the cumulative
    total of the notebooks that finished."""
    rows, total = [], 0.0
    for x, nb in _reproduce_notebooks(r):
        total += nb["wall_s"] if nb["status"] == "ran" else 0.0  # a failed or interrupted try: not counted
        status = "interrupted" if nb["status"] == "running" else nb["status"]  # stopped, never finished
        rows.append({"notebook": f"`{nb['name']}`", "status": status, "wall time": seconds(nb["wall_s"]),
                     "cumulative": seconds(total), "started": x["started"][:16].replace("T", " "),
                     "commit": (x["run"].get("git_commit") or "—")[:7],
                     "CPU": x["run"].get("cpu_model") or "not recorded"})
    return md(rows, right=("wall time", "cumulative"))


def _reproduce_total(r: Results) -> str:
    """The measured total of the run from an empty cache, or how far it got."""
    ran = [nb for _, nb in _reproduce_notebooks(r) if nb["status"] == "ran"]
    total = sum(nb["wall_s"] for nb in ran)
    done = {nb["name"] for nb in ran}
    missing = [nb for nb in NOTEBOOKS if nb not in done]
    if missing:
        return f"{seconds(total)} ({total / 3600:.2f} h) for {len(done)} of {len(NOTEBOOKS)} notebooks, not yet run: " \
               + ", ".join(f"`{nb}`" for nb in missing)
    return f"{seconds(total)} ({total / 3600:.2f} h)"


SPEED = "results/speed/speed_quick_cpu"  # benchmarks/speed.py --quick --static --masked --moe --threads 2
SPEED_RUNS = {  # further benchmarks/speed.py runs (each file's JSON has its command): table name -> (label, stem)
    "speed-b1": ("speed, batch 1", "results/speed/speed_b1_cpu"),
    "speed-b8-t128": ("speed, batch 8, 128 tokens", "results/speed/speed_b8_t128_cpu"),
    "speed-gemma": ("speed, Gemma-3-270M", "results/speed/speed_gemma_cpu"),
    "speed-b1-token": ("speed, token level at batch 1", "results/speed/speed_b1_token_cpu"),
    "speed-b1-mlp": ("speed, MLP at batch 1", "results/speed/speed_b1_mlp_cpu"),
    "speed-gemma-b1": ("speed, Gemma-3-270M at batch 1", "results/speed/speed_gemma_b1_t128_cpu"),
    "speed-moe-t128": ("speed, MoE at 128 tokens", "results/speed/speed_moe_t128_cpu"),
    "speed-b8-t128-mlp": ("speed, MLP at batch 8, 128 tokens", "results/speed/speed_b8_t128_mlp_cpu"),
    "speed-gemma-mlp": ("speed, MLP on Gemma-3-270M", "results/speed/speed_gemma_mlp_cpu"),
    "speed-b1-attn-token": ("speed, token-level attention, 11 rounds", "results/speed/speed_b1_attn_token_r11_cpu"),
    "speed-gemma-b8-t128": ("speed, Gemma-3-270M at batch 8, 128 tokens", "results/speed/speed_gemma_b8_t128_cpu"),
    "speed-gemma-b1-t512": ("speed, Gemma-3-270M at batch 1, 512 tokens", "results/speed/speed_gemma_b1_t512_cpu"),
    "speed-b1-stored": ("speed, batch 1, decision stored at prefill", "results/speed/speed_b1_stored_cpu"),
    "speed-moe": ("speed, MoE at 128 and 512 tokens, 9 rounds", "results/speed/speed_moe_r13_cpu"),
    "speed-b1-masked": ("speed, masked at batch 1, 11 rounds", "results/speed/speed_b1_masked_r11_cpu"),
    "speed-b1-attn-token-r21": ("speed, token-level attention, 21 rounds",
                                "results/speed/speed_b1_attn_token_r21_cpu"),
    "speed-b8-stored": ("speed, batch 8, decision stored at prefill", "results/speed/speed_b8_stored_cpu"),
    "speed-gemma-b8-t128-stored": ("speed, Gemma-3-270M at batch 8, 128 tokens, decision stored",
                                   "results/speed/speed_gemma_b8_t128_stored_cpu"),
    "speed-gemma-b8-t512-stored": ("speed, Gemma-3-270M at batch 8, 512 tokens, decision stored",
                                   "results/speed/speed_gemma_b8_t512_stored_cpu"),
    "speed-gemma-b1-stored": ("speed, Gemma-3-270M at batch 1, decision stored",
                              "results/speed/speed_gemma_b1_stored_cpu")}
PROFILES = {  # benchmarks/profile_speed.py runs: table name -> (label, stem)
    "profile-b1-sequence": ("profile, sequence level at batch 1", "results/speed/profile_smollm2-135m_b1_t128_pool8"),
    "profile-b1-sequence-stored": ("profile, sequence level at batch 1, decision stored",
                                   "results/speed/profile_smollm2-135m_b1_t128_pool8_stored"),
    "profile-b1-token": ("profile, token level and masked at batch 1",
                         "results/speed/profile_smollm2-135m_b1_t128_pool2"),
    "profile-moe-b1": ("profile, MoE at batch 1", "results/speed/profile_random-olmoe_b1_t128_pool8"),
    "profile-moe-b8": ("profile, MoE at batch 8", "results/speed/profile_random-olmoe_b8_t128"),
    "profile-b1-token-head": ("profile, token level at batch 1, current code",
                              "results/speed/profile_smollm2-135m_b1_t128_pool2_token"),
    "profile-gemma-b1-token": ("profile, Gemma-3 token level at batch 1",
                               "results/speed/profile_gemma3-270m_b1_t128_pool2")}
ROW_SCALING = "results/speed/row_scaling_smollm2-135m_b8_t512"  # benchmarks/row_scaling.py
BENCHMARKS = {  # the runs table's benchmark rows: label -> result JSON
    "speed": f"{SPEED}.json", **{label: f"{stem}.json" for label, stem in (*SPEED_RUNS.values(), *PROFILES.values())},
    "row scaling": f"{ROW_SCALING}.json", "training cost": "results/training_cost/training_cost_smollm2-135m.json",
    "lm-eval agreement, 0-shot": "results/lm_eval_agreement/smollm2-135m_0shot_limit200.json",
    "lm-eval agreement, MMLU 5-shot": "results/lm_eval_agreement/smollm2-135m_papershot_limit400.json",
    "lm-eval agreement, paper shots": "results/lm_eval_agreement/smollm2-135m_papershot_limit30.json"}


def _speed_ci(x: dict, col: str, sep: str = "_", digits: int = 3) -> str:
    """``1.05x [1.02, 1.07]``: speed-up column ``col`` of a row with its CI (columns ``col + sep + "ci_low"`` /
    ``"ci_high"``: ``_`` in the speed benchmark's rows, a space in the studies' ``speedup_cells``)."""
    if pd.isna(x[col]):
        return ""
    low, high = x[f"{col}{sep}ci_low"], x[f"{col}{sep}ci_high"]
    return f"{times(x[col], digits)} [{num(low, digits)}, {num(high, digits)}]"


def _speed_verdict(x: dict) -> str:
    """Whether the wall-clock speed-up is resolved: ``faster`` / ``slower`` when its CI excludes 1.0."""
    return "faster" if x["speedup_ci_low"] > 1 else "slower" if x["speedup_ci_high"] < 1 else "unresolved"


def table_speed(r: Results, stem: str = SPEED) -> str:
    df = r.csv(f"{stem}.csv")
    rows = [{"model": MODEL_NAMES.get(x["model"], x["model"]), "B": x["batch_size"], "T": x["prompt_len"],
             "setting": x["setting"],
             "skipped": num(x["skipped_share"], 3), "FLOPs": num(x["flop_fraction"], 3),
             "end-to-end [95% CI]": _speed_ci(x, "speedup"), "vs dense": _speed_verdict(x),
             "prefill": _speed_ci(x, "speedup_prefill"), "decode": _speed_ci(x, "speedup_decode"),
             "CPU time": _speed_ci(x, "cpu_speedup"), "KV cache": num(x["kv_ratio"], 3),
             "of static drop's": _speed_ci(x, "vs_static")}
            for x in df.to_dict("records") if x["setting"] != "dense"]
    return md(rows, right=("B", "T", "skipped", "FLOPs", "KV cache"))


def _band_verdict(low: float, point: float, high: float, lo: float, hi: float = math.inf) -> str:
    """Where a ratio's CI lies against the target band [lo, hi]: ``met`` (CI inside), ``missed`` (CI outside),
    else ``met at the point estimate`` / ``missed at the point estimate``."""
    if lo <= low and high <= hi:
        return "met"
    if high < lo or low > hi:
        return "missed"
    return "met at the point estimate" if lo <= point <= hi else "missed at the point estimate"


SPEED_TARGETS = ("0.95 of static drop", "token level above dense", "masked within ±3%")
VERDICTS = ("met", "met at the point estimate", "missed at the point estimate", "missed", "faster", "unresolved",
            "slower")  # _band_verdict's, then _speed_verdict's


def _speed_target_rows(r: Results) -> list[dict]:
    """Issue 16's targets over every speed run, in run order: routed ``real`` against 0.95 of static drop, token
    level against dense (above 1.0), ``masked`` within ±3% of dense; one row per run x workload x setting."""
    rows = []
    for stem in (SPEED, *(stem for _, stem in SPEED_RUNS.values())):
        for x in r.csv(f"{stem}.csv").to_dict("records"):
            setting = x["setting"]
            if setting == "dense" or "drop" in setting:
                continue
            masked = setting.endswith("masked")
            token = not masked and setting.endswith("_token")
            rows.append({
                "run": f"`{Path(stem).name}`", "model": MODEL_NAMES.get(x["model"], x["model"]),
                "B": x["batch_size"], "T": x["prompt_len"], "setting": setting,
                "vs dense": _speed_ci(x, "speedup"),
                "of static drop's": "" if masked else _speed_ci(x, "vs_static"),
                "0.95 of static drop": "" if masked or pd.isna(x["vs_static"]) else _band_verdict(
                    x["vs_static_ci_low"], x["vs_static"], x["vs_static_ci_high"], 0.95),
                "token level above dense": _speed_verdict(x) if token else "",
                "masked within ±3%": _band_verdict(x["speedup_ci_low"], x["speedup"], x["speedup_ci_high"], 0.97,
                                                   1.03) if masked else ""})
    return rows


def table_speed_targets(r: Results) -> str:
    """Every run's verdicts on issue 16's targets (``_speed_target_rows``)."""
    return md(_speed_target_rows(r), right=("B", "T"))


def table_speed_target_counts(r: Results) -> str:
    """How many settings meet each of issue 16's targets, counting each model x B x T x setting once, at its latest
    run (the runs are in the order they were made, so the latest measures the newest code)."""
    latest = {(x["model"], x["B"], x["T"], x["setting"]): x for x in _speed_target_rows(r)}
    rows = []
    for target in SPEED_TARGETS:
        for verdict in VERDICTS:
            runs = [x["run"] for x in latest.values() if x[target] == verdict]
            if runs:
                rows.append({"target": target, "verdict": verdict, "settings": len(runs),
                             "latest runs": ", ".join(sorted(set(runs)))})
    return md(rows, right=("settings",))


def table_profile(r: Results, stem: str) -> str:
    """Self CPU ms per operator group (operator calls in brackets), one column per setting, prefill and decode."""
    df = r.csv(f"{stem}.csv")
    settings = list(dict.fromkeys(df.setting))
    groups = [g for g in dict.fromkeys(df.group) if g != "total"] + ["total"]
    cells = df.set_index(["phase", "group", "setting"])
    rows = []
    for phase in ("prefill", "decode"):
        for group in groups:
            row = {"phase": phase, "group": f"**{group}**" if group == "total" else group}
            for name in settings:
                x = cells.loc[(phase, group, name)]
                row[name] = f"{x.ms:,.0f} ({int(x.calls):,})"
            rows.append(row)
    return md(rows, right=tuple(settings))


def _ratio_ci(x: dict, phase: str) -> str:
    """``0.73 [0.68, 1.63]``: a row-scaling time ratio of ``phase`` with its CI."""
    return f"{num(x[f'{phase}_vs_full'], 2)} [{num(x[f'{phase}_ci_low'], 2)}, {num(x[f'{phase}_ci_high'], 2)}]"


def table_row_scaling(r: Results) -> str:
    df = r.csv(f"{ROW_SCALING}.csv")
    B = int(df["rows"].max())
    rows = [{f"rows run (of {B})": int(x["rows"]), "prefill s": num(x["prefill_s"], 2),
             f"prefill vs {B} rows": _ratio_ci(x, "prefill"),
             "decode s": num(x["decode_s"], 2),
             f"decode vs {B} rows": _ratio_ci(x, "decode")}
            for x in df.to_dict("records")]
    return md(rows, right=(f"rows run (of {B})", "prefill s", "decode s"))


def table_training_cost(r: Results) -> str:
    df = r.csv("results/training_cost/training_cost_smollm2-135m.csv")
    record = r.json("results/training_cost/training_cost_smollm2-135m.json")
    loss = {row["method"]: row.get("final_loss") for row in record["rows"]}
    rows = [{"method": METHOD_NAMES[x.method], "steps": x.steps_run, "tokens/s": num(x.tokens_per_s, 0),
             "s / step": num(x.wall_s_per_step, 1), "wall time": seconds(x.wall_s_epoch),
             "time vs Router-Tuning": times(x.time_vs_routers), "trainable parameters":
             f"{x.trainable:,} ({num(x.trainable_pct, 4 if x.trainable_pct < 0.1 else 1)}%)",
             "peak RSS": f"{num(x.peak_rss_gib, 1)} GiB",
             "final loss": "not recorded" if loss[x.method] is None else num(loss[x.method], 2)}
            for x in df.itertuples()]
    return md(rows, right=("steps", "tokens/s", "s / step", "wall time", "time vs Router-Tuning",
                           "trainable parameters", "peak RSS", "final loss"))


def _agreement_rows(r: Results, rel: str, total: str | None) -> list[dict]:
    rows = []
    for x in r.csv(rel).to_dict("records"):
        if x["task"] == "TOTAL":
            if total:
                rows.append({"task": f"**{total}** ({seconds(x['lm-eval s'])} vs {seconds(x['ours s'])})",
                             "shots": "", "n": f"{int(x['n']):,}", "metric (both)": "",
                             "choices differing": int(x["choices differing"]), "max abs loglik diff": "",
                             "lm-eval ex/s": num(x["lm-eval ex/s"], 2), "ours ex/s": num(x["ours ex/s"], 2),
                             "speed-up": f"**{times(x['speed-up'])}**"})
            continue
        rows.append({"task": TASK_NAMES[x["task"]], "shots": int(x["shots"]), "n": int(x["n"]),
                     "metric (both)": f"{x['metric']} {x['ours']:.3f}" if x["ours"] == x["lm-eval"]
                     else f"{x['metric']} {x['lm-eval']:.3f} / {x['ours']:.3f}",
                     "choices differing": int(x["choices differing"]),
                     "max abs loglik diff": f"{x['max abs loglik diff']:.1e}",
                     "lm-eval ex/s": num(x["lm-eval ex/s"], 2), "ours ex/s": num(x["ours ex/s"], 2),
                     "speed-up": times(x["speed-up"])})
    return rows


def table_lm_eval_agreement(r: Results) -> str:
    rows = (_agreement_rows(r, "results/lm_eval_agreement/smollm2-135m_0shot_limit200.csv", "all eight, 0-shot")
            + _agreement_rows(r, "results/lm_eval_agreement/smollm2-135m_papershot_limit400.csv", None)
            + _agreement_rows(r, "results/lm_eval_agreement/smollm2-135m_papershot_limit30.csv", None))
    return md(rows, right=("shots", "n", "choices differing", "max abs loglik diff", "lm-eval ex/s", "ours ex/s",
                           "speed-up"))


QUICKSTART_METRICS = {"accuracy difference (points)": ("routed − dense accuracy (points)", 1),
                      "kl": ("KL(dense ‖ routed)", 3), "agreement": ("answer agreement", 3),
                      "delta_loglik": ("Δ gold log-likelihood", 3)}


def table_quickstart_accuracy(r: Results) -> str:
    df = r.csv("results/00_quickstart/cpu/accuracy.csv")
    rows = []
    for x in df.to_dict("records"):
        name, digits = QUICKSTART_METRICS[x["metric"]]
        acc = x["metric"] in QUICKSTART_METRICS and not pd.isna(x.get("dense"))
        rows.append({"task": TASK_NAMES[x["task"]], "metric": name, "n": x["n"],
                     "dense": num(x["dense"]) if acc else "", "routed": num(x["routed"]) if acc else "",
                     "value [95% CI]": f"{num(x['value'], digits, acc)} [{num(x['ci_low'], digits, acc)}, "
                                       f"{num(x['ci_high'], digits, acc)}]",
                     "verdict": verdict(x["ci_low"], x["ci_high"]) if acc else ""})
    return md(rows, right=("n", "dense", "routed"))


def table_quickstart_generation(r: Results) -> str:
    df = r.csv("results/00_quickstart/cpu/generation_speed.csv")
    dense_kv = df.kv_bytes.iloc[0]
    rows = [{"setting": x["setting"], "prompt tokens": x["prompt_len"], "new tokens": x["new_tokens"],
             "skipped share": num(x["skipped_share"], 3), "speed-up [95% CI]": _speed_ci(x, "speedup", "_", 2),
             "FLOP fraction": num(x["flop_fraction"], 3), "KV cache": num(x["kv_bytes"] / dense_kv, 3)}
            for x in df.to_dict("records")]
    return md(rows, right=("prompt tokens", "new tokens", "skipped share", "FLOP fraction", "KV cache"))


def _diff(x: dict, dense: bool) -> dict:
    if dense:
        return {"diff to dense [95% CI]": "", "verdict": ""}
    return {"diff to dense [95% CI]": ci(x["diff"], x["ci_low"], x["ci_high"]),
            "verdict": verdict(x["ci_low"], x["ci_high"])}


def _kl(x: dict, dense: bool) -> str:
    """``0.123 [0.110, 0.136]``: a row's KL to dense with its 95% CI (``0`` for dense)."""
    return "0" if dense else f"{num(x['kl'], 3)} [{num(x['kl_ci_low'], 3)}, {num(x['kl_ci_high'], 3)}]"


def table_table2(r: Results) -> str:
    df = r.csv("results/01_granularity/cpu/table2.csv")
    rows = [{"setting": x["setting"], "speed-up [95% CI]": _speed_ci(x, "speedup", " ", 2), "paper": times(x["speedup (paper)"]),
             "FLOP fraction": num(x["flop_fraction"], 3), "ARC-E": num(x["arc_easy"]), "PIQA": num(x["piqa"]),
             "avg": num(x["avg"]), **_diff(x, x["setting"] == "dense"),
             "paper diff (PIQA)": "" if x["setting"] == "dense" else num(x["diff (paper, same tasks)"], 1, True),
             "KL to dense [95% CI]": _kl(x, x["setting"] == "dense"), "executed": num(x["executed"], 2)}
            for x in df.to_dict("records")]
    return md(rows, right=("paper", "FLOP fraction", "ARC-E", "PIQA", "avg", "paper diff (PIQA)", "executed"))


def table_speed_accuracy(r: Results) -> str:
    df = r.csv("results/02_speed_accuracy/cpu/speed_accuracy.csv")
    rows = []
    for x in df.to_dict("records"):
        if x["capacity"] == 1.0 and x["method"] != "router":
            continue
        dense = x["capacity"] == 1.0
        rows.append({"capacity": "1.0 (dense)" if dense else num(x["capacity"], 2),
                     "method": "dense" if dense else x["method"], "accuracy": num(x["avg"]),
                     "vs dense [95% CI]": "" if dense else ci(x["diff"], x["ci_low"], x["ci_high"]),
                     "KL to dense [95% CI]": _kl(x, dense),
                     "agreement": num(x["agreement"]), "speed-up [95% CI]": _speed_ci(x, "speedup", " ", 2),
                     "FLOP fraction": num(x["flop_fraction"], 3), "attention skipped": num(x["skipped share"], 3)})
    return md(rows, right=("capacity", "accuracy", "agreement", "FLOP fraction", "attention skipped"))


def table_router_minus_baselines(r: Results) -> str:
    df = r.csv("results/02_speed_accuracy/cpu/router_minus_baselines.csv")
    df = df[df.task == "average"]
    rows = []
    for (cap, base), g in df.groupby(["capacity", "router minus"], sort=False):
        g = g.set_index("metric")
        a, k = g.loc["accuracy"], g.loc["kl"]
        rows.append({"capacity": num(cap, 2), "router minus": base,
                     "accuracy [95% CI]": ci(a["diff"], a["ci_low"], a["ci_high"]), "accuracy verdict": a["verdict"],
                     "KL [95% CI]": ci(k["diff"], k["ci_low"], k["ci_high"], 3), "KL verdict": k["verdict"]})
    return md(rows, right=("capacity",))


def table_figure2(r: Results) -> str:
    df = r.csv("results/02_speed_accuracy/cpu/figure2_router_minus_drop.csv")
    f2 = r.csv("results/02_speed_accuracy/cpu/figure2.csv").set_index("setting")
    rows = []
    for t, g in df[df.task == "average"].groupby("target", sort=False):
        g = g.set_index("metric")
        a, k = g.loc["accuracy"], g.loc["kl"]
        drop, router = f2.loc[f"{t}_layerdrop"], f2.loc[f"{t}_router"]
        rows.append({"target": t, "Layer Drop avg (KL)": f"{num(drop.avg)} ({num(drop.kl, 3)})",
                     "Router-Tuning avg (KL)": f"{num(router.avg)} ({num(router.kl, 3)})",
                     "router minus drop, accuracy [95% CI]": ci(a["diff"], a["ci_low"], a["ci_high"]),
                     "verdict": a["verdict"],
                     "router minus drop, KL [95% CI]": ci(k["diff"], k["ci_low"], k["ci_high"], 3),
                     "KL verdict": k["verdict"],
                     "paper (ARC-C, MMLU, OBQA, RTE)": num(
                         np.mean([PAPER_FIGURE2[f"{t}_router"][x] - PAPER_FIGURE2[f"{t}_layerdrop"][x]
                                  for x in PAPER_FIGURE2[f"{t}_router"]]), 1, True)})
    return md(rows, right=("Layer Drop avg (KL)", "Router-Tuning avg (KL)", "paper (ARC-C, MMLU, OBQA, RTE)"))


def table_figure3(r: Results) -> str:
    df = r.csv("results/03_generation_vs_attention_drop/cpu/figure3.csv")
    names = {"dense": "dense", "router": "Router-Tuning", "attn_drop": "Attention Drop"}
    rows = [{"setting": names[x["method"]] + ("" if x["method"] == "dense" else f", {x['target skip']:.1%}"),
             "exact match": num(x["exact match"]), **_diff(x, x["method"] == "dense"),
             "KL to dense [95% CI]": _kl(x, x["method"] == "dense"),
             "skipped share": num(x["skipped share (generation)"], 3),
             "speed-up [95% CI]": _speed_ci(x, "speed-up", " ", 2), "FLOP fraction": num(x["flop_fraction"], 3),
             "KV cache": num(x["kv ratio"], 3), "paper": num(x["exact match (paper)"])} for x in df.to_dict("records")]
    return md(rows, right=("exact match", "skipped share", "FLOP fraction", "KV cache", "paper"))


def table_figure3_router_minus_drop(r: Results) -> str:
    df = r.csv("results/03_generation_vs_attention_drop/cpu/figure3_router_minus_drop.csv")
    rows = [{"skipped": f"{x['target skip']:.1%}", "metric": x["metric"],
             "router minus drop [95% CI]": ci(x["diff"], x["ci_low"], x["ci_high"],
                                              1 if x["metric"] == "exact match" else 3),
             "router closer to dense": x["verdict"],
             "paper": "" if pd.isna(x["diff (paper)"]) else num(x["diff (paper)"], 1, True)}
            for x in df.to_dict("records")]
    return md(rows, right=("skipped", "paper"))


def table_table4(r: Results) -> str:
    df = r.csv("results/04_training_cost/cpu/table4.csv")
    rows = [{"method": x.method, "steps": x.steps_run, "s / step": num(x.wall_s_per_step, 2),
             "time vs Router-Tuning": times(x.time_vs_routers), "tokens/s": num(x.tokens_per_s, 0),
             "trainable parameters": f"{x.trainable:,} ({num(x.trainable_pct, 4 if x.trainable_pct < 0.1 else 2)}%)",
             "peak RSS": f"{num(x.peak_memory_gib, 2)} GiB", "final loss": num(x.final_loss, 2)}
            for x in df.itertuples()]
    return md(rows, right=("steps", "s / step", "time vs Router-Tuning", "tokens/s", "trainable parameters",
                           "peak RSS", "final loss"))


def table_num_layers(r: Results) -> str:
    df = r.csv("results/05_num_layers/cpu/num_layers.csv")
    rows = [{"model": MODEL_NAMES.get(x["model"], x["model"]), "n / N": "0" if x["n"] == 0 else f"{x['n']}/{x['layers']}",
             "avg": num(x["avg"]), **_diff(x, x["n"] == 0), "KL to dense [95% CI]": _kl(x, x["n"] == 0),
             "executed": num(x["executed"], 2)} for x in df.to_dict("records")]
    return md(rows, right=("avg", "executed"))


def table_half_vs_max(r: Results) -> str:
    df = r.csv("results/05_num_layers/cpu/half_vs_max.csv")
    rows = [{"model": MODEL_NAMES.get(x["model"], x["model"]), "from": f"{x['n half']}/{x['layers']}",
             "to": f"{x['n max']}/{x['layers']}",
             "accuracy change [95% CI]": ci(x["max − half"], x["ci_low max − half"], x["ci_high max − half"]),
             "verdict": verdict(x["ci_low max − half"], x["ci_high max − half"]),
             "KL change [95% CI]": ci(x["kl max − half"], x["kl ci_low max − half"], x["kl ci_high max − half"], 3),
             "KL verdict": verdict(x["kl ci_low max − half"], x["kl ci_high max − half"])}
            for x in df.to_dict("records")]
    return md(rows, right=("from", "to"))


def table_table5(r: Results) -> str:
    df = r.csv("results/06_across_models/cpu/table5.csv")
    rows = [{"model": MODEL_NAMES.get(x["model"], x["model"]), "routed layers": f"{x['routed layers']} of {x['layers']}",
             "dense": num(x["dense"]), "routed": num(x["routed"]), **_diff(x, False),
             "KL to dense [95% CI]": _kl(x, False), "executed": num(x["executed"], 2),
             "speed-up [95% CI]": _speed_ci(x, "speedup", " ", 2), "FLOP fraction": num(x["flop_fraction"], 3),
             "KV cache": num(x["kv ratio"], 2)}
            for x in df.to_dict("records")]
    return md(rows, right=("routed layers", "dense", "routed", "executed", "FLOP fraction", "KV cache"))


def table_table5_tasks(r: Results) -> str:
    df = r.csv("results/06_across_models/cpu/table5_tasks.csv")
    rows = [{"model": MODEL_NAMES.get(x["model"], x["model"]), "task": TASK_NAMES.get(x["task"], x["task"]),
             "n": x["n"], "dense": num(x["dense"]), "routed": num(x["routed"]),
             "diff [95% CI]": ci(x["diff"], x["ci_low"], x["ci_high"]), "verdict": verdict(x["ci_low"], x["ci_high"]),
             "KL to dense [95% CI]": _kl(x, False), "agreement": num(x["agreement"])} for x in df.to_dict("records")]
    return md(rows, right=("n", "dense", "routed", "agreement"))


def table_table6(r: Results) -> str:
    df = r.csv("results/07_training_data/cpu/all_runs.csv")
    names = {"offline-mix": "offline mix", "offline-mix:csqa": "CommonsenseQA", "offline-mix:socialiqa": "Social IQa",
             "offline-mix:sciq": "SciQ"}
    rows = [{"data / samples": "dense" if x["setting"] == "dense" else f"{names.get(x['source'], x['source'])} / {x['samples']}",
             "avg": num(x["avg"]), **_diff(x, x["setting"] == "dense"),
             "KL to dense [95% CI]": _kl(x, x["setting"] == "dense"),
             "steps": "" if x["setting"] == "dense" else x["steps"],
             "capacity at the end of training": "" if x["setting"] == "dense" else num(x["train capacity"], 2),
             "executed in evaluation": num(x["executed"], 2)} for x in df.to_dict("records")]
    return md(rows, right=("avg", "steps", "capacity at the end of training", "executed in evaluation"))


def table_table7(r: Results) -> str:
    df = r.csv("results/08_moe/cpu/table7.csv")
    rows = [{"setting": x["setting"], "avg": num(x["avg"]), **_diff(x, x["setting"] == "dense"),
             "skipped (evaluation)": f"{x['skipped share']:.1%}", "skipped (timing prompts)":
             f"{x['skipped share (timing)']:.1%}", "speed-up": times(x["speedup"])} for x in df.to_dict("records")]
    return md(rows, right=("avg", "skipped (evaluation)", "skipped (timing prompts)", "speed-up"))


def table_moe_real_vs_masked(r: Results) -> str:
    df = r.csv("results/08_moe/cpu/real_vs_masked.csv")
    rows = [{"setting": x["setting"], "tokens": x["tokens"], "max abs logit diff": f"{x['max_abs_logit_diff']:.1e}",
             "top-1 agreement": num(x["top1_agreement"], 3), "executed, real": num(x["executed_real"], 4),
             "executed, masked": num(x["executed_masked"], 4)} for x in df.to_dict("records")]
    return md(rows, right=("tokens", "max abs logit diff", "top-1 agreement", "executed, real", "executed, masked"))


def table_table8(r: Results) -> str:
    df = r.csv("results/09_lora/cpu/table8.csv")
    names = {"dense": "dense", "router": "Router-Tuning", "lora": "LoRA", "lora_router": "LoRA + Router-Tuning"}
    rows = [{"setting": names[x["setting"]], "avg": num(x["avg"]), **_diff(x, x["setting"] == "dense"),
             "KL to its base [95% CI]": _kl(x, x["setting"] == "dense"),
             "base": "" if x["setting"] == "dense" else names[x["kl to"]],
             "speed-up [95% CI]": _speed_ci(x, "speedup", " ", 2), "FLOP fraction": num(x["flop_fraction"], 3),
             "executed": num(x["executed"], 2),
             "paper (Llama-3-8B)": f"{num(x['avg (paper, Llama-3-8B)'])} ({times(x['speedup (paper, Llama-3-8B)'])})"}
            for x in df.to_dict("records")]
    return md(rows, right=("avg", "FLOP fraction", "executed", "paper (Llama-3-8B)"))


def table_lora_router_minus_lora(r: Results) -> str:
    df = r.csv("results/09_lora/cpu/lora_router_minus_lora.csv")
    rows = [{"task": TASK_NAMES.get(x["task"], x["task"]), "metric": x["metric"], "n": x["n"],
             "difference [95% CI]": ci(x["diff"], x["ci_low"], x["ci_high"], 1 if x["metric"] == "accuracy" else 3),
             "verdict": x["verdict"]} for x in df.to_dict("records")]
    return md(rows, right=("n",))


def table_task_selection(r: Results) -> str:
    df = r.csv("results/task_selection/task_selection.csv")
    rows = [{"model": MODEL_NAMES[x.model], "task": f"{TASK_NAMES[x.task]} ({x.metric})", "shots": x.shots, "n": x.n,
             "score [95% CI]": f"{num(100 * x.value)} [{num(100 * x.ci_low)}, {num(100 * x.ci_high)}]",
             "chance": num(100 * max(x.chance, 0 if pd.isna(x.majority) else x.majority)),
             "above chance": "yes" if x.above_chance else "no"} for x in df.itertuples()]
    return md(rows, right=("shots", "n", "chance"))


def table_dynamics_fidelity(r: Results) -> str:
    df = r.csv("results/10_router_dynamics/cpu/fidelity.csv")
    rows = [{"setting": x.setting, "n": x.n, "mean KL to dense": num(x.mean_kl, 3),
             "minus trained [95% CI]": "" if x.verdict == "reference" else ci(x.diff, x.ci_low, x.ci_high, 3),
             "trained closer to dense": "" if x.verdict == "reference" else x.verdict} for x in df.itertuples()]
    return md(rows, right=("n", "mean KL to dense"))


HEADLINE_METRICS = {"kl": ("KL(dense ‖ model)", 4), "delta_loglik": ("Δ gold log-likelihood", 4),
                    "agreement": ("answer agreement", 3), "ppl_ratio": ("perplexity ratio", 4)}


def _metric(metric: str, value, low, high) -> str:
    """``value [low, high]`` with the metric's number of decimals."""
    d = HEADLINE_METRICS[metric][1]
    return f"{num(value, d)} [{num(low, d)}, {num(high, d)}]"


def table_headline_fidelity(r: Results) -> str:
    df = r.csv("results/11_headline_fidelity/cpu/fidelity.csv")
    rows = [{"setting": x["setting"], "task": TASK_NAMES.get(x["task"], x["task"]),
             "metric": HEADLINE_METRICS[x["metric"]][0], "n": x["n"],
             "attention skipped": num(x["attention skipped (all layers)"], 3),
             "value [95% CI]": _metric(x["metric"], x["value"], x["ci_low"], x["ci_high"])}
            for x in df.to_dict("records") if x["metric"] in ("kl", "ppl_ratio")]
    return md(rows, right=("n", "attention skipped"))


def table_headline_paired(r: Results) -> str:
    df = r.csv("results/11_headline_fidelity/cpu/paired.csv")
    df = df[(df.task == "multiple choice (pooled)") | (df.metric == "kl")]  # held-out text has only KL
    rows = [{"tuned router (per-layer) minus": x["router minus"], "task": TASK_NAMES.get(x["task"], x["task"]),
             "metric": HEADLINE_METRICS[x["metric"]][0], "n": x["n"],
             "difference [95% CI]": ci(x["diff"], x["ci_low"], x["ci_high"], HEADLINE_METRICS[x["metric"]][1]),
             "router closer to dense": x["router closer to dense"]} for x in df.to_dict("records")]
    return md(rows, right=("n",))


def table_ablation_training(r: Results) -> str:
    df = r.csv("results/12_router_ablation/cpu/training.csv")
    rows = [{"variant": x["variant"], "steps": x["steps"], "train capacity (last step)":
             num(x["train capacity (last step)"], 3), "lambda (last step)": num(x["lambda (last step)"], 2),
             "held-out executed at 0.5": num(x["held-out executed at 0.5"], 3),
             "within 0.5 ± 0.05": "yes" if x["within target ±0.05"] else "no",
             "layer shares (min-max)": f"{num(x['layer min'], 2)}-{num(x['layer max'], 2)}",
             "dynamic layers": f"{x['dynamic layers (0 < share < 1)']} of {x['layers']}"}
            for x in df.to_dict("records")]
    return md(rows, right=("steps", "train capacity (last step)", "lambda (last step)", "held-out executed at 0.5"))


def table_ablation_figure4(r: Results) -> str:
    df = r.csv("results/12_router_ablation/cpu/figure4_skip_ratio.csv")
    cols = [c for c in df.columns if c != "layer"]
    rows = [{"layer": x["layer"], **{c: num(x[c], 2) for c in cols}} for x in df.to_dict("records")]
    return md(rows, right=("layer", *cols))


def table_ablation_pull(r: Results) -> str:
    df = r.csv("results/12_router_ablation/cpu/decision_pull.csv")
    rows = []
    for state, g in df.groupby("state", sort=False):
        lam = g.capacity_weight.iloc[0]
        judged = g.agrees.notna().any()
        rows.append({"routers": state, "lambda": f"{lam:g}", "switch weights (min-max)":
                     f"{num(g.switch_weight.min(), 4)} to {num(g.switch_weight.max(), 4)}",
                     "layers with switch weight > lambda": f"{int((g.switch_weight > lam).sum())} of {len(g)}",
                     "layers kept (executed >= 0.5)": f"{int((g.executed >= 0.5).sum())} of {len(g)}",
                     "hinge active": "yes" if g.hinge_active.iloc[0] else "no",
                     "state predicted": f"{int(g.agrees.astype(bool).sum())} of {len(g)}" if judged else ""})
    return md(rows)


def table_ablation_fidelity(r: Results) -> str:
    df = r.csv("results/12_router_ablation/cpu/fidelity.csv")
    rows = []
    for x in df.to_dict("records"):
        row = {"setting": x["variant"] if x["rule"] == "baseline" else f"{x['variant']} · {x['rule']}",
               "executed (gated layers)": num(x["executed"], 3),
               "attention skipped (all layers)": num(x["skipped (all layers)"], 3), "mean KL": num(x["mean KL"], 3)}
        for label in ("static drop", "random router"):
            has = not pd.isna(x.get(f"minus {label}"))
            row[f"minus {label} [95% CI]"] = (ci(x[f"minus {label}"], x[f"{label} ci_low"], x[f"{label} ci_high"], 3)
                                              if has else "")
            row[f"vs {label}"] = x[f"vs {label}"] if has else ""
        rows.append(row)
    return md(rows, right=("executed (gated layers)", "attention skipped (all layers)", "mean KL"))


TABLES = {
    "runs": table_runs, "reproduce": table_reproduce, "speed": table_speed, "training-cost": table_training_cost,
    "lm-eval-agreement": table_lm_eval_agreement, "quickstart-accuracy": table_quickstart_accuracy,
    "quickstart-generation": table_quickstart_generation, "table2": table_table2,
    "speed-accuracy": table_speed_accuracy, "router-minus-baselines": table_router_minus_baselines,
    "figure2": table_figure2, "figure3": table_figure3,
    "figure3-router-minus-drop": table_figure3_router_minus_drop, "table4": table_table4,
    "num-layers": table_num_layers, "half-vs-max": table_half_vs_max, "table5": table_table5,
    "table5-tasks": table_table5_tasks, "table6": table_table6, "table7": table_table7,
    "moe-real-vs-masked": table_moe_real_vs_masked, "table8": table_table8,
    "lora-router-minus-lora": table_lora_router_minus_lora, "task-selection": table_task_selection,
    "dynamics-fidelity": table_dynamics_fidelity, "headline-fidelity": table_headline_fidelity,
    "headline-paired": table_headline_paired, "ablation-training": table_ablation_training,
    "ablation-fidelity": table_ablation_fidelity, "ablation-pull": table_ablation_pull,
    "ablation-figure4": table_ablation_figure4, "row-scaling": table_row_scaling,
    "speed-targets": table_speed_targets,
    "speed-target-counts": table_speed_target_counts,
    **{name: (lambda r, stem=stem: table_speed(r, stem)) for name, (_, stem) in SPEED_RUNS.items()},
    **{name: (lambda r, stem=stem: table_profile(r, stem)) for name, (_, stem) in PROFILES.items()},
}

# ---- inline numbers ---------------------------------------------------------------------------------------------


def _steps(records: dict, keys=None) -> str:
    """The optimizer steps of the tuning records (``run.json["tuning"]``), e.g. ``15`` or ``15-16``."""
    steps = sorted({v["steps"] for k, v in records.items() if keys is None or k in keys})
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"


def _cell(r: Results, rel: str, col: str, **where) -> float:
    """``col`` of the single row of ``rel`` whose columns equal ``where``."""
    df = r.csv(rel)
    for k, v in where.items():
        df = df[df[k] == v]
    if len(df) != 1:
        raise ValueError(f"{rel}: {len(df)} rows match {where}, expected 1")
    return float(df[col].iloc[0])


def _same_router_speedups(r: Results) -> str:
    """End-to-end speed-ups of the SmolLM2 attention/sequence router on 15 layers at capacity 0.5, per notebook."""
    speedups = [(_cell(r, "results/01_granularity/cpu/table2.csv", "speedup", setting="attn_sequence"), "01"),
                (_cell(r, "results/02_speed_accuracy/cpu/speed_accuracy.csv", "speedup", method="router",
                       capacity=0.5), "02"),
                (_cell(r, "results/06_across_models/cpu/table5.csv", "speedup", model="smollm2-135m"), "06"),
                (_cell(r, "results/09_lora/cpu/table8.csv", "speedup", setting="router"), "09")]
    return ", ".join(f"{times(x)} in {nb}" for x, nb in speedups)


def _train_log(r: Results) -> pd.DataFrame:
    return r.csv("results/00_quickstart/cpu/router-tuning/train_log.csv")


def _full_capacity_routers(r: Results) -> str:
    """The single-source routers of 07 that ended training executing (almost) everything."""
    rows = r.csv("results/07_training_data/cpu/all_runs.csv").to_dict("records")
    return ", ".join(f"{x['source'].split(':')[-1]} ({num(x['train capacity'], 3)})" for x in rows
                     if x["setting"] != "dense" and x["train capacity"] >= 0.99) or "none"


def _lm_eval_total(r: Results) -> str:
    total = r.csv("results/lm_eval_agreement/smollm2-135m_0shot_limit200.csv").query("task == 'TOTAL'").iloc[0]
    return f"{seconds(total['lm-eval s'])} for lm-eval and {seconds(total['ours s'])} for this harness"


def _training_cost_capacity(r: Results) -> str:
    row = next(x for x in r.json("results/training_cost/training_cost_smollm2-135m.json")["rows"]
               if x["method"] == "routers")
    return (f"{num(row['capacity_trained'], 3)} in the last training step; after calibration "
            f"{num(row['capacity_calibrated'], 3)} on the calibration conversations and "
            f"{num(row['capacity_held_out'], 3)} on another held-out set")


def _figure4(r: Results) -> str:
    """Per-layer skip ratios of 02's attention router at one global threshold (capacity 0.5) and of Layer Drop."""
    df = r.csv("results/02_speed_accuracy/cpu/figure4_skip_ratio.csv")
    skip, drop = df["router (global threshold, capacity 0.5)"], df["layer drop"]
    return (f"{num(100 * skip.min(), 0)}%-{num(100 * skip.max(), 0)}% per layer (mean {num(100 * skip.mean(), 0)}%; "
            f"{int((skip > 0).sum())} of {len(df)} layers skip some sequences, {int((skip < 1).sum())} run for some, "
            f"{int(((skip == 0) | (skip == 1)).sum())} are always on or always off); Layer Drop removes "
            f"{int((drop == 1).sum())} of {len(df)} routed layers entirely")


def _figure3_layers(r: Results) -> str:
    """At 12.5% skipping: the range of the router's per-layer executed shares during generation, and the layers the
    attention drop removes."""
    routing = r.json("results/03_generation_vs_attention_drop/cpu/run.json")["eval_routing"]
    shares = routing["router_0.125"]["layers"].values()
    return (f"the router executes each routed layer for {min(shares):.0%}-{max(shares):.0%} of the generated "
            f"sequences; the importance-based drop removes layers {', '.join(routing['attn_drop_0.125']['layers'])}")


def _moe_max_load(r: Results) -> str:
    df = r.csv("results/08_moe/cpu/figure8_max_load_per_layer.csv")
    return (f"from {num(df['max load, gate (dense)'].max())}x to "
            f"{num(df['max load, Router-Tuning executed'].max())}x the mean")


def _ci_row(r: Results, rel: str, **where) -> str:
    return ci(*(_cell(r, rel, c, **where) for c in ("diff", "ci_low", "ci_high")))


VALUES = {
    "reproduce-total": _reproduce_total,
    "granularity-steps": lambda r: _steps(r.json("results/01_granularity/cpu/run.json")["tuning"]),
    "smollm2-router-steps": lambda r: _steps(r.json("results/06_across_models/cpu/run.json")["tuning"],
                                             ["smollm2-135m"]),
    "figure3-router-steps": lambda r: str(r.json("results/03_generation_vs_attention_drop/cpu/run.json")
                                          ["router_record"]["steps"]),
    "quickstart-steps": lambda r: str(int(_train_log(r).step.max())),
    "quickstart-tuning-s": lambda r: seconds(_train_log(r).elapsed_s.iloc[-1]),
    "quickstart-executed-eval": lambda r: "{:.1%}".format(
        r.json("results/00_quickstart/cpu/run.json")["eval_routing"]["overall"]),
    "quickstart-skipped-timing": lambda r: "{:.1%}".format(_cell(
        r, "results/00_quickstart/cpu/generation_speed.csv", "skipped_share", setting="routed (real)")),
    "training-cost-capacity": _training_cost_capacity,
    "lm-eval-total": _lm_eval_total,
    "same-router-speedups": _same_router_speedups,
    "table6-full-capacity": _full_capacity_routers,
    "lora-steps": lambda r: _steps(r.json("results/09_lora/cpu/run.json")["tuning"]),
    "figure4": _figure4,
    "figure3-layers": _figure3_layers,
    "moe-max-load": _moe_max_load,
    "lora-router-minus-lora": lambda r: _ci_row(r, "results/09_lora/cpu/lora_router_minus_lora.csv", task="average",
                                                metric="accuracy"),
}


# ---- rendering --------------------------------------------------------------------------------------------------


def _generate(kind: str, name: str, root: Path) -> str:
    registry = TABLES if kind == "table" else VALUES
    if name not in registry:
        raise ValueError(f"results README: unknown {kind} marker {name!r}; known {kind}s: {sorted(registry)}")
    r = Results(root)
    text = registry[name](r)
    if kind == "value":
        return text
    return "\nSource: " + ", ".join(f"`{s}`" for s in r.sources) + ".\n\n" + text + "\n\n"


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every marked block / value regenerated from the result files under ``root``."""
    opened = len(re.findall(r"<!-- (?:table|value):", text))
    if opened != len(MARKER.findall(text)):
        raise ValueError("results README: a <!-- table:NAME --> or <!-- value:NAME --> marker has no matching "
                         "<!-- /table --> / <!-- /value --> (or they are nested); fix the markers")
    return MARKER.sub(lambda m: f"<!-- {m[1]}:{m[2]} -->{_generate(m[1], m[2], root)}<!-- /{m[1]} -->", text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=ROOT / "results" / "README.md")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 with a diff if the README is stale")
    args = p.parse_args(argv)
    old = args.readme.read_text()
    new = render(old, args.readme.resolve().parent.parent)
    if args.check:
        if old != new:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(args.readme),
                                                       "generated from the result files"))
            print(f"\n{args.readme} differs from its result files; run python -m routertune_lib.results_readme")
            return 1
        return 0
    if old != new:
        write_atomic(args.readme, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
