"""Where the time of routed generation goes: torch-profiler CPU time per operator group, prefill and decode apart.

    python benchmarks/profile_speed.py                       # SmolLM2, batch 8, 512-token prompts, 16 new tokens
    python benchmarks/profile_speed.py --settings dense attn_token "attn static drop" --batch-size 1
    python benchmarks/profile_speed.py --settings dense attn_sequence --batch-size 1 --pool 8   # 8 prompts, one by one
    python benchmarks/profile_speed.py --model random-olmoe --settings dense experts_token "expert drop" --batch-size 1
    python benchmarks/profile_speed.py --smoke --out /tmp/profile   # tiny random model, seconds

The settings are ``benchmarks/speed.py``'s (random routers calibrated per layer to ``--capacity`` of the ``--pool``
prompts, static drop of the same number of sub-layers; for ``random-olmoe``, its expert routers and Expert Drop),
built by its own functions. Each setting runs one untimed warm-up generation, then, for each batch of
``--batch-size`` prompts of the pool, a profiled prefill (one forward over the batch, cache on) and
``--new-tokens - 1`` profiled greedy decode steps on that cache; the batches' times and calls are summed.
Sequence-level routing needs a pool larger than the batch: a threshold calibrated on one prompt cannot give it a
capacity of 0.5. Operators are grouped (``GROUPS``): matrix products, attention kernels, routing bookkeeping (index
building, gathers and scatters, comparisons), normalisation and elementwise math, the rest; the phase's wall time
outside any operator (Python and dispatch, under the profiler's own overhead) is its own group. Output: one row per
setting x phase x group with milliseconds of self CPU time, its share of the phase, operator calls (dispatch
overhead scales with them) and its difference from dense, written to ``<out>/<name>.{csv,md}`` with the ``--top``
operators of each setting in ``<name>_ops.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed as speed_benchmark  # noqa: E402  (benchmarks/speed.py: the same settings)

from routertune_lib.reporting import run_info, write_atomic, write_json, write_table  # noqa: E402
from routertune_lib.routing import routing_mode  # noqa: E402
from routertune_lib.speed import prompt_pool  # noqa: E402

GROUPS = {  # first match wins, on the aten operator name
    "matmul": ("linear", "addmm", "mm", "bmm", "matmul", "baddbmm"),
    "attention kernel": ("scaled_dot_product", "_flash_attention", "softmax", "_efficient_attention"),
    "routing bookkeeping": ("index", "gather", "scatter", "nonzero", "argsort", "sort", "masked", "where", "ge",
                            "lt", "le", "gt", "eq", "any", "all", "item", "_local_scalar_dense", "arange",
                            "expand", "repeat", "cumsum"),
    "norm and elementwise": ("mul", "add", "rsqrt", "pow", "mean", "silu", "gelu", "tanh", "neg", "cat", "sigmoid",
                             "div", "sub", "exp", "sum"),
}


OUTSIDE = "outside operators"


def group_of(op: str) -> str:
    if op == OUTSIDE:
        return OUTSIDE
    name = op.removeprefix("aten::")
    for group, keys in GROUPS.items():
        if any(name == k or name.startswith(k + "_") or name.startswith("_" + k) for k in keys):
            return group
    return "other"


@torch.no_grad()
def profiled_phases(model, mode, ids: torch.Tensor, new_tokens: int) -> dict[str, pd.DataFrame]:
    """``{"prefill" | "decode": per-operator self CPU ms}`` of one greedy generation of ``ids`` ``[B, T]``."""
    out = {}
    with routing_mode(model, mode) if mode else contextlib.nullcontext():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            wall = time.perf_counter() - start
        out["prefill"] = _ops(prof, wall)
        cache, token = step.cache, step.logits[:, -1].argmax(-1, keepdim=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                step = model(input_ids=token, cache=cache, use_cache=True)
                cache, token = step.cache, step.logits[:, -1].argmax(-1, keepdim=True)
            wall = time.perf_counter() - start
        out["decode"] = _ops(prof, wall)
    return out


def _ops(prof, wall_s: float) -> pd.DataFrame:
    """Self CPU ms per operator, plus ``OUTSIDE``: the phase's wall time not spent inside any operator (Python,
    dispatch; negative when several threads run operators at once)."""
    rows = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in prof.key_averages()]
    inside = sum(r["self_ms"] for r in rows)
    return pd.DataFrame(rows + [{"op": OUTSIDE, "self_ms": wall_s * 1e3 - inside, "calls": 0}])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--settings", nargs="+", default=["dense", "attn_sequence", "attn_token", "mlp_token",
                                                     "block_token", "attn static drop", "block static drop"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--pool", type=int, default=None, help="prompts to calibrate on and profile, a multiple of "
                   "--batch-size (default: one batch)")
    p.add_argument("--capacity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--name", default=None, help="default profile_<model>_b<B>_t<T> (--smoke: profile_smoke_..., "
                   "or profile_smoke-<MoE model>_... for the MoE model)")
    p.add_argument("--out", default=str(speed_benchmark.ROOT / "results" / "speed"))
    args = p.parse_args(argv)
    args.pool = args.pool or args.batch_size
    if args.pool % args.batch_size:
        p.error(f"--pool {args.pool} must be a multiple of --batch-size {args.batch_size}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    routed = [s for s in args.settings if s != "dense"]  # build only the targets and levels asked for
    targets = sorted({s.split("_")[0].split(" ")[0] for s in routed} & set(speed_benchmark.TARGETS)) or ["attn"]
    levels = sorted({s.split("_")[1].split(" ")[0] for s in routed if "_" in s} & set(speed_benchmark.LEVELS))
    bench = speed_benchmark.parse_args(["--smoke" if args.smoke else "--quick", "--static", "--masked",
                                        "--capacity", str(args.capacity), "--models", args.model,
                                        "--targets", *targets, "--levels", *(levels or ["sequence"])])
    model = speed_benchmark.load(args.model, bench)
    T = 16 if args.smoke else args.prompt_len
    pool = prompt_pool(model.config.vocab_size, args.pool, T, seed=0)
    moe = args.model == speed_benchmark.MOE  # notebook 08's MoE: expert routers, Expert Drop
    settings = (speed_benchmark.moe_settings if moe else speed_benchmark.dense_settings)(model, pool, bench)
    settings = speed_benchmark.selected(settings, args.settings)  # raises on an unknown name
    new_tokens = 3 if args.smoke else args.new_tokens
    rows, top, provenance = [], [], run_info()  # provenance at the start: the code this process imported
    for name in args.settings:
        m, mode = settings[name]
        profiled_phases(m, mode, pool[:1, :8], 2)  # warm-up
        phases = [profiled_phases(m, mode, batch, new_tokens) for batch in pool.split(args.batch_size)]
        for phase in phases[0]:
            ops = pd.concat([batch[phase] for batch in phases]).groupby("op", as_index=False)[["self_ms", "calls"]]
            ops = ops.sum()  # summed over the pool's batches
            ops["group"] = ops.op.map(group_of)
            total = ops.self_ms.sum()
            for group, g in ops.groupby("group"):
                rows.append({"setting": name, "phase": phase, "group": group, "ms": g.self_ms.sum(),
                             "share": g.self_ms.sum() / total, "calls": int(g.calls.sum())})
            rows.append({"setting": name, "phase": phase, "group": "total", "ms": total, "share": 1.0,
                         "calls": int(ops.calls.sum())})
            top.append(f"### {name}, {phase}\n\n" + ops.sort_values("self_ms", ascending=False).head(args.top)
                       .to_markdown(index=False, floatfmt=".2f") + "\n")
        logging.info("profiled %s", name)
    table = pd.DataFrame(rows)
    dense = table[table.setting == "dense"].set_index(["phase", "group"]).ms
    table["minus dense ms"] = [r.ms - dense.get((r.phase, r.group), 0.0) for r in table.itertuples()]
    pooled = f"_pool{args.pool}" if args.pool > args.batch_size else ""
    label = f"smoke-{args.model}" if args.smoke and moe else "smoke" if args.smoke else args.model  # MoE: its own
    name = args.name or f"profile_{label}_b{args.batch_size}_t{T}{pooled}"
    out = Path(args.out)
    write_table(table, out, name, floatfmt=".3f")
    write_atomic(out / f"{name}_ops.md", "\n".join(top))
    write_json(out / f"{name}.json", {"command": "python benchmarks/profile_speed.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "args": vars(args), "torch_threads": torch.get_num_threads(),
        "run": provenance})
    print(table.pivot_table(index=["phase", "group"], columns="setting", values="ms").round(1).to_markdown())
    return table


if __name__ == "__main__":
    main()
