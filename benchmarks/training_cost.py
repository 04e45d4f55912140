"""Training cost (the paper's Table 4 claim): Router-Tuning vs LoRA vs full fine-tuning on the same data and steps.

    python benchmarks/training_cost.py                      # SmolLM2-135M, CPU, 1,000 samples at max length 256
    python benchmarks/training_cost.py --steps-other 3      # LoRA / full FT: time 3 steps, extrapolate to the run

Each method runs in its own process (so peak memory is its own) on the same conversations, global batch and
micro-batch. Router-Tuning runs every step of one epoch; LoRA and full fine-tuning run ``--steps-other`` steps (or
all, with 0) and their wall time for the whole epoch is extrapolated from the measured time per step (marked).
After Router-Tuning the thresholds are calibrated to the target capacity on held-out conversations; the table
reports the capacity reached in training, after calibration, and on a second held-out set.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_method(args) -> dict:
    """Train with one method in this process; returns its measurements."""
    from routertune_lib.data import load_instruction_data
    from routertune_lib.models import load_model
    from routertune_lib.routing import RouterConfig, routed_layers
    from routertune_lib.training import LoraSettings, TrainConfig, calibrate_thresholds, train_routers

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    data = load_instruction_data("offline-mix", limit=args.samples + 2 * args.held_out, seed=args.seed)
    train, calib, test = (data[: args.samples], data[args.samples : args.samples + args.held_out],
                          data[args.samples + args.held_out :])
    steps = args.samples // args.global_batch
    limit = steps if args.method == "routers" or args.steps_other == 0 else min(args.steps_other, steps)
    router_config = RouterConfig(target="attn", level="sequence", num_layers=args.num_layers,
                                 capacity=args.capacity, capacity_weight=args.capacity_weight)
    out = {"method": args.method, "steps_total": steps, "steps_run": limit}
    if args.method == "full":
        out.update(full_finetune(model, tokenizer, train, args, limit))
    else:
        cfg = TrainConfig(learning_rate=args.lr if args.method == "routers" else args.lr_lora,
                          global_batch_size=args.global_batch, micro_batch_size=args.micro_batch,
                          max_length=args.max_length, seed=args.seed, output_dir=tempfile.mkdtemp(),
                          lora=LoraSettings() if args.method == "lora" else None,
                          train_routers=args.method == "routers")
        result = train_routers(model, tokenizer, train, router_config, cfg, stop_after=limit)
        out.update(wall_s=result.wall_time_s, tokens_per_s=result.tokens_per_s,
                   peak_rss_bytes=result.peak_memory_bytes, trainable=result.trainable_parameters,
                   total=result.total_parameters, final_loss=result.final_loss)
        if args.method == "routers":
            out["capacity_trained"] = result.final_capacity
            calibrate_thresholds(model, calib, args.capacity, tokenizer=tokenizer, max_length=args.max_length)
            for name, convs in (("capacity_calibrated", calib), ("capacity_held_out", test)):
                out[name] = _executed(model, tokenizer, convs, args.max_length)
            out["layers"] = list(routed_layers(model))
    return out


def _executed(model, tokenizer, conversations, max_length) -> float:
    from routertune_lib.training import _calibration_batches

    executed = total = 0.0
    with torch.no_grad():
        for batch in _calibration_batches(conversations, tokenizer, 8, max_length, model.device):
            for e, n in model(**batch, use_cache=False).routing.counts().values():
                executed, total = executed + e, total + n
    return executed / total


def full_finetune(model, tokenizer, train, args, limit) -> dict:
    """Plain full fine-tuning (every parameter, AdamW) on the same batches and schedule as Router-Tuning."""
    from routertune_lib.training import _collate, _pad_id, tokenize_conversations

    rows = tokenize_conversations(tokenizer, train, args.max_length)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr_full, weight_decay=0.0)
    tokens, start = 0, time.perf_counter()
    for step in range(limit):
        batch = [rows[i] for i in order[step * args.global_batch : (step + 1) * args.global_batch]]
        n_labels = sum(sum(t != -100 for t in r["labels"][1:]) for r in batch)
        for j in range(0, len(batch), args.micro_batch):
            mb = _collate(batch[j : j + args.micro_batch], _pad_id(tokenizer))
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), mb["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")
            (loss / n_labels).backward()
            tokens += int(mb["attention_mask"].sum())
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - start
    n = sum(p.numel() for p in model.parameters())
    return dict(wall_s=wall, tokens_per_s=tokens / wall, trainable=n, total=n,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, final_loss=None)


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
    p.add_argument("--methods", nargs="+", default=["routers", "lora", "full"])
    p.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    p.add_argument("--out", default=str(ROOT / "results" / "training_cost"))
    args = p.parse_args(argv)

    if args.method:
        print("RESULT " + json.dumps(run_method(args)))
        return
    from routertune_lib.reporting import run_info, write_json, write_table

    start = time.time()
    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for method in args.methods:
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--method", method],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:]))
    df = pd.DataFrame(rows)
    df["wall_s_per_step"] = df.wall_s / df.steps_run
    df["wall_s_epoch"] = df.wall_s_per_step * df.steps_total
    df["epoch_time"] = ["measured" if r.steps_run == r.steps_total else "extrapolated" for r in df.itertuples()]
    rt = df[df.method == "routers"].iloc[0]
    df["time_vs_routers"] = df.wall_s_epoch / rt.wall_s_epoch
    df["trainable_pct"] = 100 * df.trainable / df.total
    df["peak_rss_gib"] = df.peak_rss_bytes / 2**30
    cols = ["method", "steps_run", "steps_total", "tokens_per_s", "wall_s_per_step", "wall_s_epoch", "epoch_time",
            "time_vs_routers", "trainable", "trainable_pct", "peak_rss_gib"]
    print(df[cols].to_markdown(index=False, floatfmt=".4g"))
    print({k: rt[k] for k in ("capacity_trained", "capacity_calibrated", "capacity_held_out") if k in rt})
    name = f"training_cost_{args.model.replace('/', '_')}"
    write_table(df[cols], args.out, name, floatfmt=".4g")
    write_json(Path(args.out) / f"{name}.json", {
        "command": "python benchmarks/training_cost.py " + " ".join(shlex.quote(a) for a in passthrough),
        "args": vars(args), "wall_time_s": time.time() - start, "run": run_info(), "rows": rows})


if __name__ == "__main__":
    main()
