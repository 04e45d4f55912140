"""What running K of a batch's B rows costs: dense generation on the first K prompts, K = 1..B, per phase.

A sequence-level router that keeps K of a batch's B rows in a layer runs that layer on K rows; static drop runs it
on none. So routing saves ``cost(B) - cost(K)`` of a layer where static drop saves ``cost(B)``, and the routed
speed-up can reach static drop's only where ``cost(K) / cost(B)`` falls with ``K / B``. Every decoder layer of a
model has the same shapes, so the whole model's ``cost(K) / cost(B)`` is a layer's (the embedding and the LM head
scale the same way). Each round times ``generate`` at every K once (interleaved; one warm-up round first), with
``routertune_lib.speed.timed_generate``; ratios are per round, reported as the median with ``median_ci``'s CI.

    python benchmarks/row_scaling.py --model smollm2-135m --batch-size 8 --prompt-len 512 --new-tokens 32
    python benchmarks/row_scaling.py --smoke --out /tmp/rows      # tiny random model, seconds; numbers meaningless

Writes ``<out>/<name>.{csv,md,json}`` (default name ``row_scaling_<model>_b<B>_t<T>``).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from routertune_lib.models import load_model, tiny_random_model
from routertune_lib.reporting import run_info, write_json, write_table
from routertune_lib.speed import median_ci, prompt_pool, timed_generate

ROOT = Path(__file__).resolve().parent.parent


def row_costs(model, prompts: torch.Tensor, rows: list[int], new_tokens: int, repeats: int) -> pd.DataFrame:
    """Per K in ``rows``: median prefill and decode seconds of ``generate`` on ``prompts[:K]`` ``[K, T]`` and their
    per-round ratio to the largest K, with 95% order-statistic CIs."""
    full = max(rows)
    times: dict[int, list[dict]] = {k: [] for k in rows}
    for r in tqdm(range(1 + repeats), desc=f"rows {rows}", leave=False):
        for k in rows:
            result = timed_generate(model, prompts[:k], new_tokens)
            if r > 0:  # round 0 is the warm-up
                times[k].append(result)
    out = []
    for k in rows:
        row = {"rows": k, "of_batch": k / full}
        for phase in ("prefill", "decode"):
            row[f"{phase}_s"] = float(pd.Series([x[phase] for x in times[k]]).median())
            ratio = [x[phase] / b[phase] for x, b in zip(times[k], times[full])]
            row[f"{phase}_vs_full"], row[f"{phase}_ci_low"], row[f"{phase}_ci_high"], coverage = median_ci(ratio)
        row["ci_coverage"] = coverage
        out.append(row)
    return pd.DataFrame(out)


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=8, help="B, the full batch")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="K values (default 1, B/4, B/2, 3B/4, B)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=str(ROOT / "results" / "speed"))
    args = p.parse_args(argv)
    B = args.batch_size
    rows = sorted(set(args.rows or [1, max(1, B // 4), max(1, B // 2), max(1, 3 * B // 4), B]))
    if rows[0] < 1 or rows[-1] != B:
        raise SystemExit(f"--rows must lie in 1..{B} and include the batch size {B}; got {args.rows}")
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens must be at least 2 (a prefill and a decode step); got {args.new_tokens}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = tiny_random_model(args.model, num_layers=2, hidden_size=64)[0] if args.smoke else load_model(args.model)[0]
    T = 16 if args.smoke else args.prompt_len
    start, provenance = time.time(), run_info()  # provenance at the start: the code this process imported
    table = row_costs(model, prompt_pool(model.config.vocab_size, B, T, seed=0), rows, args.new_tokens, args.repeats)
    table.insert(0, "model", args.model)
    table.insert(1, "prompt_len", T)
    table.insert(2, "new_tokens", args.new_tokens)
    name = args.name or f"row_scaling_{'smoke' if args.smoke else args.model}_b{B}_t{T}"
    out = Path(args.out)
    write_table(table, out, name)
    command = "python " + shlex.join(["benchmarks/row_scaling.py", *(argv if argv is not None else sys.argv[1:])])
    write_json(out / f"{name}.json", {"command": command, "args": vars(args), "wall_time_s": time.time() - start,
                                      "torch_threads": torch.get_num_threads(), "run": provenance,
                                      "rows": table.to_dict(orient="records")})
    print(table.to_markdown(index=False, floatfmt=".3f"))
    return table


if __name__ == "__main__":
    main()
