"""Which tasks carry an accuracy signal at CPU scale: both bundled models on all nine multiple-choice tasks.

For each model and shot setting, every task is scored on the same seeded ``--limit`` documents (the whole split
when it is smaller), with a 95% CI (normal approximation, ``1.96 * stderr``) beside the chance level (mean of
1 / number of choices; BoolQ and RTE also have a majority-class rate, printed as ``majority``). A task is
``above chance`` when its CI's lower end clears both. Results are cached per task by ``evaluate``, so an
interrupted run resumes where it stopped. Writes ``results/task_selection/task_selection.{csv,md}`` (rows of
earlier runs kept, this run's replace theirs) and appends this run's record to ``run.json``'s ``runs``.

    python benchmarks/task_selection.py --models smollm2-135m gemma3-270m --shots 0 --limit 500
    python benchmarks/task_selection.py --models smollm2-135m --shots paper --limit 500
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from routertune_lib import evaluation as ev
from routertune_lib.models import load_model
from routertune_lib.reporting import run_info, write_json, write_table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "task_selection"
RUNS = OUT / "run.json"


def majority_rate(task_name: str, limit: int | None, seed: int) -> float | None:
    """Share of the most frequent gold index on the evaluated docs, for tasks whose choices are fixed labels."""
    task = ev.get_task(task_name)
    if task_name not in ("boolq", "rte"):
        return None
    _, docs = ev.task_docs(task_name, limit, seed)
    counts = Counter(task.gold(d) for d in docs)
    return max(counts.values()) / len(docs)


def rows_for(model_name: str, tasks: list[str], shots: str, limit: int, seed: int, batch_size: int) -> list[dict]:
    model, tok = load_model(model_name)
    num_fewshot = None if shots == "paper" else int(shots)
    rows = []
    for name in tasks:
        r = ev.evaluate(model, tok, [name], num_fewshot=num_fewshot, limit=limit, seed=seed,
                        batch_size=batch_size).tasks[name]
        half = 1.96 * r.stderr[r.metric]
        floor = max(r.chance, majority_rate(name, limit, seed) or 0.0)
        rows.append({
            "model": model_name, "task": name, "shots": r.num_fewshot, "metric": r.metric, "n": r.n,
            "value": r.score, "ci_low": r.score - half, "ci_high": r.score + half, "ci_half_width": half,
            "chance": r.chance, "majority": majority_rate(name, limit, seed),
            "above_chance": bool(r.score - half > floor), "margin_over_chance": r.score - floor,
            "eval_seconds": round(r.seconds, 1), "cached": r.cached,
        })
        logging.info("%s %s %d-shot: %s = %.3f +- %.3f (chance %.3f)", model_name, name, r.num_fewshot, r.metric,
                     r.score, half, floor)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--shots", nargs="+", default=["0"], help="'0' and/or 'paper' (Table 1 shots per task)")
    p.add_argument("--tasks", nargs="+", default=list(ev.MC_TASKS), choices=list(ev.MC_TASKS))
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    for s in args.shots:
        if s != "paper" and not s.isdigit():
            raise SystemExit(f"--shots takes '0', another non-negative integer or 'paper', got {s!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    provenance = run_info()  # at the start: the code this process imported
    t0 = time.perf_counter()
    new = pd.DataFrame([r for m in args.models for s in args.shots
                        for r in rows_for(m, args.tasks, s, args.limit, args.seed, args.batch_size)])
    csv = OUT / "task_selection.csv"
    table, key = new, ["model", "task", "shots"]
    if csv.is_file():  # keep rows of other models / shots from earlier runs; this run's rows win
        old = pd.read_csv(csv)
        old = old[~old.set_index(key).index.isin(new.set_index(key).index)]
        table = pd.concat([old, new], ignore_index=True)
    table = table.sort_values(["model", "shots", "task"]).reset_index(drop=True)
    write_table(table, OUT, "task_selection")
    this = {**provenance, "command": "python " + shlex.join(sys.argv),
            "wall_time_s": round(time.perf_counter() - t0, 1), "limit": args.limit, "seed": args.seed,
            "batch_size": args.batch_size, "rows": [f"{m} {t} {s}" for m, t, s in new[key].values]}
    earlier = json.loads(RUNS.read_text()) if RUNS.is_file() else {"runs": []}
    earlier = earlier.get("runs", [earlier])  # a record written before run.json kept every run is one run
    write_json(RUNS, {"runs": earlier + [this]})  # every run that wrote rows of the table, oldest first
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
