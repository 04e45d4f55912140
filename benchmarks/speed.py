"""Speed and KV-cache benchmark: dense vs routed (real) vs routed (masked) vs static drop, side by side.

    python benchmarks/speed.py                       # bundled SmolLM2-135M, CPU, writes results/speed/
    python benchmarks/speed.py --routers r.safetensors --model smollm2-135m --device cuda --batch-sizes 1 16 64

Routed: attention routers, sequence level, on half the layers (the deepest except the last), thresholds calibrated
per layer so that a ``--capacity`` fraction of the prompt pool executes each routed layer. Without ``--routers`` the
router weights are random (seeded): the speed of a routing decision does not depend on how it was trained.
Static drop: the same number of attention executions removed by dropping whole layers (LLM-Drop importance, among
the routed layers), i.e. the physical ceiling of the routed speed-up. Masked: the routed model computing everything
and multiplying by the decision (the control; expected ~1.0x).
"""

from __future__ import annotations

import argparse
import copy
import logging
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from routertune_lib.baselines import attach_static_drop, least_important, module_importance
from routertune_lib.models import load_model
from routertune_lib.reporting import run_info, write_json, write_table
from routertune_lib.routing import RouterConfig, attach_routers, load_routers, routed_layers
from routertune_lib.speed import compare_settings, prompt_pool
from routertune_lib.training import calibrate_thresholds

ROOT = Path(__file__).resolve().parent.parent


def build_settings(model, pool: torch.Tensor, capacity: float, num_layers: int, routers: str | None, seed: int) -> dict:
    """``{name: (model, mode)}`` for dense, routed real/masked and static drop, all calibrated on ``pool``."""
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in pool.split(8)]
    routed = copy.deepcopy(model)
    if routers:
        load_routers(routed, routers)
    else:
        attach_routers(routed, RouterConfig(target="attn", level="sequence", num_layers=num_layers, capacity=capacity))
        g = torch.Generator().manual_seed(seed)
        for layer in routed_layers(routed).values():
            w = torch.randn(layer.router.weight.shape, generator=g) / layer.router.weight.shape[1] ** 0.5
            layer.router.weight.data.copy_(w)
    calibrate_thresholds(routed, batches, capacity=capacity, per_layer=True)
    layers = list(routed_layers(routed))
    importance = module_importance(model, batches)["attn"]
    dropped = least_important(importance, round(len(layers) * (1 - capacity)), candidates=layers)
    static = attach_static_drop(copy.deepcopy(model), "attn", dropped)
    logging.info("routed layers %s; static drop of %s", layers, dropped)
    return {
        "dense": (model, None),
        "routed-real": (routed, "real"),
        "routed-masked": (routed, "masked"),
        "static-drop": (static, None),
    }


def with_ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """Add speed-ups and KV ratio relative to the dense row of the same workload, and real / static."""
    out = []
    for _, group in rows.groupby(["batch_size", "prompt_len"], sort=False):
        dense = group[group.setting == "dense"].iloc[0]
        g = group.copy()
        g["speedup_e2e"] = dense.generate_s / g.generate_s
        g["speedup_prefill"] = dense.prefill_s / g.prefill_s
        g["speedup_decode"] = g.decode_tok_s / dense.decode_tok_s
        g["kv_ratio"] = g.kv_bytes / dense.kv_bytes
        static = g[g.setting == "static-drop"].iloc[0]
        g["vs_static"] = g.speedup_e2e / static.speedup_e2e  # target for routed-real: >= 0.95
        g["gain_vs_static"] = (g.speedup_e2e - 1) / (static.speedup_e2e - 1)  # share of static's time saving
        out.append(g)
    return pd.concat(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--routers", default=None, help="router checkpoint (save_routers); default: random routers")
    p.add_argument("--capacity", type=float, default=0.5)
    p.add_argument("--num-layers", type=int, default=16, help="routed layers (paper: 16); even, so that static drop "
                   "removes exactly the same number of attention executions at capacity 0.5")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--pool", type=int, default=8, help="prompts per workload (a multiple of every batch size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "speed"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if any(args.pool % b for b in args.batch_sizes):
        p.error(f"--pool {args.pool} must be a multiple of every batch size {args.batch_sizes}")

    start = time.time()
    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    rows = []
    for prompt_len in args.prompt_lens:
        pool = prompt_pool(model.config.vocab_size, args.pool, prompt_len, seed=args.seed)
        settings = build_settings(model, pool, args.capacity, args.num_layers, args.routers, args.seed)
        for batch_size in args.batch_sizes:
            found = compare_settings(settings, pool, batch_size, args.new_tokens, repeats=args.repeats)
            rows += [r.as_dict() for r in found]
    table = with_ratios(pd.DataFrame(rows))
    cols = ["setting", "batch_size", "prompt_len", "skipped_share", "prefill_tok_s", "decode_tok_s",
            "generate_s", "speedup_prefill", "speedup_decode", "speedup_e2e", "vs_static", "gain_vs_static", "kv_ratio"]
    print(table[cols].to_markdown(index=False, floatfmt=".3f"))
    name = f"speed_{args.model.replace('/', '_')}_{next(model.parameters()).device.type}"
    write_table(table[cols], args.out, name)
    write_json(Path(args.out) / f"{name}.json", {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "args": vars(args),
        "wall_time_s": time.time() - start,
        "run": run_info(),
        "rows": table.to_dict(orient="records"),
    })


if __name__ == "__main__":
    main()
