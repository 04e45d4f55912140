"""Training cost (the paper's Table 4 claim): Router-Tuning vs LoRA vs full fine-tuning on the same data and steps.

    python benchmarks/training_cost.py                      # SmolLM2-135M, CPU, 1,000 samples at max length 256
    python benchmarks/training_cost.py --steps-other 3      # LoRA / full FT: time 3 steps, extrapolate to the run

Each method runs in its own process (so peak memory is its own) on the same conversations, global batch and
micro-batch. Router-Tuning runs every step of one epoch; LoRA and full fine-tuning run ``--steps-other`` steps (or
all, with 0) and their wall time for the whole epoch is extrapolated from the measured time per step (marked).
After Router-Tuning the thresholds are calibrated to the target capacity on held-out conversations; the table
reports the capacity reached in training, after calibration, and on a second held-out set.
The measurement itself is :func:`routertune_lib.training_cost.training_cost` (notebook 04 calls it too).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from routertune_lib.training_cost import METHODS, CostConfig, cost_table, measure_methods, run_method

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["method", "steps_run", "steps_total", "tokens_per_s", "wall_s_per_step", "wall_s_epoch", "epoch_time",
           "time_vs_routers", "trainable", "trainable_pct", "peak_rss_gib"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--held-out", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=15)
    p.add_argument("--capacity", type=float, default=0.5)
    p.add_argument("--capacity-weight", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3, help="router lr (a CPU run has only ~15 steps)")
    p.add_argument("--lr-lora", type=float, default=2e-4)
    p.add_argument("--lr-full", type=float, default=1e-5)
    p.add_argument("--steps-other", type=int, default=3, help="steps timed for LoRA / full FT (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # internal: run one method in this process
    p.add_argument("--out", default=str(ROOT / "results" / "training_cost"))
    args = p.parse_args(argv)
    config = CostConfig(model=args.model, samples=args.samples, held_out=args.held_out, max_length=args.max_length,
                        global_batch=args.global_batch, micro_batch=args.micro_batch, num_layers=args.num_layers,
                        capacity=args.capacity, capacity_weight=args.capacity_weight, lr=args.lr,
                        lr_lora=args.lr_lora, lr_full=args.lr_full, steps_other=args.steps_other, seed=args.seed)
    if args.method:
        print("RESULT " + json.dumps(run_method(config, args.method)))
        return
    from routertune_lib.reporting import run_info, write_json, write_table

    start = time.time()
    passthrough = list(argv if argv is not None else sys.argv[1:])
    provenance = run_info()  # at the start: the code this process imported
    rows = measure_methods(config, args.methods)
    df = cost_table(rows)
    print(df[COLUMNS].to_markdown(index=False, floatfmt=".4g"))
    rt = df[df.method == "routers"]
    if len(rt):
        print({k: rt.iloc[0][k] for k in ("capacity_trained", "capacity_calibrated", "capacity_held_out")})
    name = f"training_cost_{args.model.replace('/', '_')}"
    write_table(df[COLUMNS], args.out, name, floatfmt=".4g")
    write_json(Path(args.out) / f"{name}.json", {
        "command": "python benchmarks/training_cost.py " + " ".join(shlex.quote(a) for a in passthrough),
        "args": vars(args), "config": config.to_dict(), "wall_time_s": time.time() - start, "run": provenance,
        "rows": rows})


if __name__ == "__main__":
    main()
