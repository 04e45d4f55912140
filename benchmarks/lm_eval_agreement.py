"""Agreement and speed of routertune's harness against LM-Evaluation-Harness 0.4.x on the same docs and model.

For each task the evaluated subset of our rows (``load_task``, same seeded ``limit`` subset as ``evaluate``) is
exported to JSONL with a task YAML (in a temp dir) that ``include``s lm-eval's own task config and only points it at
the local file (``routertune_lib.lm_eval_model.export_task``). MMLU gets one YAML per sampled
subject including lm-eval's ``mmlu_<subject>.yaml``; its metric is the accuracy over all questions (the size-weighted
group mean). lm-eval's ``hf`` model (HFLM) wraps the same loaded model object; both harnesses use the same batch
size. Prints per task: both metrics, per-example choice disagreements, max |loglik difference|, examples/s, and
writes the table (plus a TOTAL row: summed times) to ``results/lm_eval_agreement/`` with the command that made it.

    python benchmarks/lm_eval_agreement.py --tasks piqa,hellaswag,mmlu --limit 50 --num-fewshot 0
    python benchmarks/lm_eval_agreement.py --tasks paper --limit 200 --num-fewshot 0      # the eight paper tasks
    python benchmarks/lm_eval_agreement.py --tasks mmlu,arc_challenge --limit 20 --num-fewshot paper  # Table 1 shots
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from routertune_lib import evaluation as ev
from routertune_lib.lm_eval_model import export_task
from routertune_lib.lm_eval_model import lm_eval_yaml as _find_yaml  # noqa: F401 (tests render lm-eval's YAMLs)
from routertune_lib.reporting import run_info, write_json, write_table

ROOT = Path(__file__).resolve().parent.parent


def lm_eval_requests(name: str, limit: int | None, seed: int, shots: int, out: Path) -> list[list[tuple[str, str]]]:
    """lm-eval's own ``(context, continuation)`` requests for the docs ``evaluate`` scores, in its doc order: the
    task exported to ``out`` is built by lm-eval, few-shot sampling included (what ``simple_evaluate`` does)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    made = export_task(name, limit, seed, shots, out)
    tasks = get_task_dict([m for m, _ in made], TaskManager(include_path=str(out)))
    by_doc: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for lm_name, pidx in made:
        task = tasks[lm_name]
        task.set_config(key="num_fewshot", value=shots)
        task.set_fewshot_seed(seed=seed)
        task.build_all_requests(limit=None, rank=0, world_size=1)
        for inst in sorted(task.instances, key=lambda x: (x.doc_id, x.idx)):
            by_doc[pidx[inst.doc_id]].append(tuple(inst.arguments))
    idx, _ = ev.task_docs(name, limit, seed)
    return [by_doc[i] for i in idx]


def run(task_names, limit, shots, seed, batch_size, model_name, share_context=True, repeats=2):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from routertune_lib.models import load_model

    model, tok = load_model(model_name, device="cpu")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    with torch.no_grad():  # warm-up
        model(input_ids=torch.tensor([tok.encode("warm up the kernels")]))
    report = {"model": model_name, "limit": limit, "num_fewshot": shots, "batch_size": batch_size, "seed": seed,
              "repeats": repeats, "run": run_info(), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="rtagree-") as tmp:
        tmp = Path(tmp)
        for name in task_names:
            task = ev.get_task(name)
            k = task.num_fewshot if shots == "paper" else int(shots)
            made = export_task(name, limit, seed, k, tmp)
            tm = TaskManager(include_path=str(tmp))
            t_lm = t_ours = float("inf")  # best of `repeats` wall times (the machine is shared), alternating
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = simple_evaluate(
                    model=lm, tasks=[m for m, _ in made], num_fewshot=k, task_manager=tm, log_samples=True,
                    batch_size=batch_size, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                    torch_random_seed=seed, fewshot_random_seed=seed,
                )
                t_lm = min(t_lm, time.perf_counter() - t0)
                t0 = time.perf_counter()
                ours = ev.evaluate(model, tok, [name], num_fewshot=k, limit=limit, seed=seed,
                                   batch_size=batch_size, cache=False, share_context=share_context).tasks[name]
                t_ours = min(t_ours, time.perf_counter() - t0)
            by_id = {r["doc_id"]: r for r in ours.records}
            dis, dis_other, max_dll, correct = 0, 0, 0.0, []
            for lm_task, pidx in made:
                for s in res["samples"][lm_task]:
                    rec = by_id[pidx[s["doc_id"]]]
                    lls = np.array([float(r[0]) for r in s["filtered_resps"]])
                    lens = np.array(rec["char_len"])
                    pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lens))
                    mine = rec["pred_norm"] if task.metric == "acc_norm" else rec["pred"]
                    theirs = pred_norm if task.metric == "acc_norm" else pred
                    dis += int(mine != theirs)
                    dis_other += int((rec["pred"], rec["pred_norm"]) != (pred, pred_norm))
                    max_dll = max(max_dll, float(np.abs(lls - np.array(rec["loglik"])).max()))
                    correct.append(float(s[task.metric]))
            n = len(correct)
            row = {
                "task": name, "shots": k, "metric": task.metric, "n": n, "lm_eval": float(np.mean(correct)),
                "ours": ours.score,
                "disagreements": dis, "disagreements_acc_or_norm": dis_other, "max_abs_loglik_diff": max_dll,
                "lm_eval_s": t_lm, "ours_s": t_ours, "lm_eval_ex_per_s": n / t_lm, "ours_ex_per_s": n / t_ours,
                "speedup": t_lm / t_ours,
            }
            report["tasks"][name] = row
            print(
                f"{name:12s} {k:2d}-shot {task.metric:8s} n={n:4d} lm-eval={row['lm_eval']:.4f} ours={row['ours']:.4f} "
                f"disagree={dis} (acc|norm {dis_other}) max|dll|={max_dll:.2e} "
                f"ex/s lm-eval={row['lm_eval_ex_per_s']:.2f} ours={row['ours_ex_per_s']:.2f} "
                f"speedup={row['speedup']:.2f}x",
                flush=True,
            )
    rows = list(report["tasks"].values())
    t_lm, t_ours = sum(r["lm_eval_s"] for r in rows), sum(r["ours_s"] for r in rows)
    n = sum(r["n"] for r in rows)
    report["total"] = {
        "task": "TOTAL", "n": n, "disagreements": sum(r["disagreements"] for r in rows), "lm_eval_s": t_lm,
        "ours_s": t_ours, "lm_eval_ex_per_s": n / t_lm, "ours_ex_per_s": n / t_ours, "speedup": t_lm / t_ours,
    }
    print(f"TOTAL n={n} lm-eval {t_lm:.0f} s, ours {t_ours:.0f} s: {t_lm / t_ours:.2f}x", flush=True)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="piqa,hellaswag,mmlu", help="comma-separated, or 'paper' for the eight")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--num-fewshot", default="0", help="an int, or 'paper' for each task's Table 1 shots")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--no-share-context", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="time each harness this many times, keep the best")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "lm_eval_agreement",
                   help="folder for <model>_<shots>shot_limit<limit>.{csv,md,json}")
    args = p.parse_args(argv)
    if args.num_fewshot != "paper" and not args.num_fewshot.isdigit():
        p.error(f"--num-fewshot must be an int or 'paper', not {args.num_fewshot!r}")
    tasks = list(ev.PAPER_TASKS) if args.tasks == "paper" else args.tasks.split(",")
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    report = run(tasks, args.limit, args.num_fewshot, args.seed, args.batch_size, args.model,
                 share_context=not args.no_share_context, repeats=args.repeats)
    report["wall_time_s"] = time.time() - start  # the whole run: loading, both harnesses, every task
    report["command"] = shlex.join(["python", "benchmarks/lm_eval_agreement.py", *(argv or sys.argv[1:])])
    write_report(report, args.out, f"{args.model}_{args.num_fewshot}shot_limit{args.limit}")
    return 0


def write_report(report: dict, out: Path, name: str) -> None:
    """``<out>/<name>.json`` (the whole report) and ``.csv``/``.md`` (one row per task and the TOTAL)."""
    write_json(out / f"{name}.json", report)
    rows = pd.DataFrame([*report["tasks"].values(), report["total"]])
    table = pd.DataFrame({
        "task": rows.task, "shots": [f"{v:.0f}" if pd.notna(v) else "" for v in rows.shots], "n": rows.n,
        "metric": rows.metric.fillna(""),
        "lm-eval": rows.lm_eval, "ours": rows.ours, "choices differing": rows.disagreements,
        "max abs loglik diff": [f"{v:.1e}" if pd.notna(v) else "" for v in rows.max_abs_loglik_diff],
        "lm-eval s": rows.lm_eval_s, "ours s": rows.ours_s, "lm-eval ex/s": rows.lm_eval_ex_per_s,
        "ours ex/s": rows.ours_ex_per_s, "speed-up": rows.speedup,
    })
    write_table(table, out, name)


if __name__ == "__main__":
    sys.exit(main())
