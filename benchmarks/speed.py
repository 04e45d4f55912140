"""Speed benchmark: dense vs routed (real / masked) at all six granularities vs static drop of each target, and MoE.

    python benchmarks/speed.py --estimate        # the plan and its estimated runtime, runs nothing
    python benchmarks/speed.py --quick           # SmolLM2, 512-token prompts, batch 8, six granularities (~10 min)
    python benchmarks/speed.py                   # both bundled models, prompts 128/512, batch 1/8, static, masked, MoE
    python benchmarks/speed.py --smoke --out /tmp/speed   # tiny random models, seconds; numbers meaningless

Routed settings: routers with random weights (seeded; the speed of a decision does not depend on how the router was
trained) on the ``--num-layers`` deepest layers except the last (default: half the layers, rounded up to even),
thresholds calibrated per layer so that each routed layer executes exactly ``--capacity`` of the timing pool's
sequences or tokens (prefill); ``masked`` runs the same routers computing everything (the control). Static drop of
each target removes the same number of executions, ``num_layers * (1 - capacity)`` whole sub-layers chosen by
LLM-Drop importance among the routed layers: the ceiling of the routed speed-up at the same skipped fraction. MoE: a
random OLMoE-architecture model (notebook 08's cpu setting) with random expert routers calibrated to
``--moe-capacity`` of the assignments, and Expert Drop of the same share. Timing: ``speed.compare_settings``
(warm-up, interleaved rounds, medians, CIs of per-round ratios, CPU time, FLOP fractions); all settings of a model
share its weights (``--copy-controls`` adds two dense copies as null controls). Results:
``<out>/<name>.{csv,md,json}``, ``<out>/<name>_summary.md`` and ``<out>/run.json``.
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
from routertune_lib.experiments import randomize_routers
from routertune_lib.flops import FlopSpec, forward_flops
from routertune_lib.models import load_model, shared_copy, tiny_random_model
from routertune_lib.moe import (attach_expert_drop, expert_drop_plan, expert_router_config, expert_statistics,
                                tiny_random_moe)
from routertune_lib.reporting import run_info, write_atomic, write_json, write_table
from routertune_lib.routing import RouterConfig, attach_routers, routed_layers
from routertune_lib.speed import compare_settings, median_ci, prompt_pool
from routertune_lib.training import calibrate_thresholds

ROOT = Path(__file__).resolve().parent.parent
TARGETS, LEVELS = ("attn", "mlp", "block"), ("sequence", "token")
MOE = "random-olmoe"  # notebook 08's cpu setting
MOE_ARGS = dict(num_layers=8, hidden_size=256, intermediate_size=768, num_experts=16, top_k=4)

# Cost model of the runtime estimate, fitted to the dense rows of a 2-thread CPU run of the benchmark at commit
# e9ed14d: prefill ~500 tokens/s of ~290 MFLOP each; decode 0.051 s per step at batch 1 and 0.094 s at batch 8 =
# per-layer overhead + batch FLOPs / rate. The --quick --static --masked --moe run committed in results/speed/ took
# about 2.8 times its estimate: the estimate is for planning only.
PREFILL_FLOP_S = 140e9
DECODE_FLOP_S = 49e9
DECODE_LAYER_S = 1.5e-3


# ----------------------------------------------------------------------------------------------------------------
# Settings


def dense_settings(model, pool: torch.Tensor, args) -> dict:
    """``{name: (model, mode)}``: dense, each target x level routed (real, masked), static drop of each target."""
    n = args.num_layers or _half_even(model.config.num_hidden_layers)
    settings = {"dense": (model, None)}
    if args.copy_controls:  # null controls, 1.0x by construction up to memory placement
        settings["dense (deep copy)"] = (copy.deepcopy(model), None)  # fresh weight tensors, as notebooks' copies
        settings["dense (shared copy)"] = (shared_copy(model), None)  # new modules over the same tensors
    layers = None
    for target in args.targets:
        for level in args.levels:
            routed = attach_routers(shared_copy(model), RouterConfig(target=target, level=level, num_layers=n,
                                                                     capacity=args.capacity))
            randomize_routers(routed, args.seed)
            calibrate_thresholds(routed, [{"input_ids": pool}], args.capacity, per_layer=True)
            layers = list(routed_layers(routed))
            settings[f"{target}_{level}"] = (routed, "real")
            if args.masked:
                settings[f"{target}_{level} masked"] = (routed, "masked")
    if args.static:
        layers = layers or RouterConfig(num_layers=n).resolve_layers(model.config.num_hidden_layers)
        importance = module_importance(model, [{"input_ids": ids} for ids in pool.split(1)])  # [1, T, vocab] logits
        drop = round(len(layers) * (1 - args.capacity))
        for target in args.targets:
            dropped = least_important(importance[target], drop, candidates=layers)
            settings[f"{target} static drop"] = (attach_static_drop(shared_copy(model), target, dropped), None)
            logging.info("static %s drop of layers %s", target, dropped)
    return settings


def moe_settings(model, pool: torch.Tensor, args) -> dict:
    """``{name: (model, mode)}``: dense MoE, random expert routers (real, masked), Expert Drop of the same share."""
    batches = [{"input_ids": ids} for ids in pool.split(1)]
    routed = attach_routers(shared_copy(model), expert_router_config(model, capacity=args.moe_capacity))
    randomize_routers(routed, args.seed)
    calibrate_thresholds(routed, batches, capacity=args.moe_capacity, per_layer=True)
    plan, share = expert_drop_plan(expert_statistics(model, batches), 1 - args.moe_capacity)
    logging.info("Expert Drop of %s (%.3f of assignments)", plan, share)
    settings = {"dense": (model, None), "experts_token": (routed, "real")}
    if args.masked:
        settings["experts_token masked"] = (routed, "masked")
    if args.static:
        settings["expert drop"] = (attach_expert_drop(shared_copy(model), plan), None)
    return settings


def selected(settings: dict, names: list[str] | None) -> dict:
    """``settings`` restricted to ``names`` (``--settings``; None: all), in their built order; dense is always kept,
    as the reference every ratio is taken to. Raises ``ValueError`` naming an unknown setting and the known ones."""
    if names is None:
        return settings
    unknown = sorted(set(names) - set(settings))
    if unknown:
        raise ValueError(f"--settings: unknown setting(s) {unknown}; this plan builds {list(settings)} (add "
                         "--static / --masked / --targets / --levels to build more)")
    return {name: s for name, s in settings.items() if name == "dense" or name in names}


def _half_even(num_layers: int) -> int:
    """Half the layers, rounded up to an even number (so that capacity 0.5 skips whole layers' worth)."""
    n = -(-num_layers // 2)
    return min(n + n % 2, num_layers - 1)


def load(name: str, args):
    """The model to benchmark: a bundled model, or (``--smoke``) a tiny random one; ``MOE``: notebook 08's MoE."""
    if name == MOE:
        kwargs = dict(num_layers=2, hidden_size=64, intermediate_size=64, num_experts=8, top_k=2) if args.smoke \
            else MOE_ARGS
        return tiny_random_moe(**kwargs)[0]
    if args.smoke:
        return tiny_random_model(name, num_layers=4, hidden_size=64)[0]
    return load_model(name, device=args.device, dtype=args.dtype)[0]


# ----------------------------------------------------------------------------------------------------------------
# Plan and runtime estimate (counting forwards and FLOPs; nothing is timed)


def settings_count(args, moe: bool) -> int:
    if args.settings is not None:
        return len({"dense", *args.settings})
    if moe:
        return 2 + args.masked + args.static
    return (1 + 2 * args.copy_controls + len(args.targets) * len(args.levels) * (1 + args.masked)
            + args.static * len(args.targets))


def estimate_seconds(config, args, moe: bool) -> float:
    """Estimated seconds of one model's part of the plan on the reference machine (see the cost model above)."""
    spec = FlopSpec.from_config(config)
    rounds = 1 + args.repeats
    total = 0.0
    for T in args.prompt_lens:
        pool_forward = forward_flops(spec, None, {}, args.pool, T)[1] / PREFILL_FLOP_S  # calibration-like forward
        total += pool_forward * (len(args.targets) * len(args.levels) + args.static if not moe
                                 else spec.num_layers + 2)
        for B in args.batch_sizes:
            batches = args.pool // B
            prefill = forward_flops(spec, None, {}, B, T, 0, 1)[1] / PREFILL_FLOP_S
            decode = sum(spec.num_layers * DECODE_LAYER_S + forward_flops(spec, None, {}, B, 1, T + i, 1)[1]
                         / DECODE_FLOP_S for i in range(args.new_tokens - 1))
            total += rounds * settings_count(args, moe) * batches * (prefill + decode)
    return total


# ----------------------------------------------------------------------------------------------------------------
# Tables


def with_ratios(found: list, model: str) -> pd.DataFrame:
    """Rows of one workload plus kv_ratio (vs dense) and vs_static: the routed speed-up over the static drop of the
    same target, median of per-round ratios with CI (``vs_static`` >= 0.95 is issue 16's target)."""
    rows = pd.DataFrame([r.as_dict() for r in found])
    rows.insert(0, "model", model)
    rows["kv_ratio"] = rows.kv_bytes / rows.kv_bytes.iloc[0]
    rounds = {r.setting: r.round_generate_s for r in found}
    for col in ("vs_static", "vs_static_ci_low", "vs_static_ci_high"):
        rows[col] = float("nan")
    for i, name in enumerate(rows.setting):
        target = name.split("_")[0].split(" ")[0]
        static = {"experts": "expert drop"}.get(target, f"{target} static drop")
        if static in rounds and name != static:
            point, low, high, _ = median_ci([s / r for s, r in zip(rounds[static], rounds[name])])
            rows.loc[i, ["vs_static", "vs_static_ci_low", "vs_static_ci_high"]] = point, low, high
    return rows


def _ci(r, col: str) -> str:
    return f"{r[col]:.3f} [{r[col + '_ci_low']:.3f}, {r[col + '_ci_high']:.3f}]"


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One line per setting and workload: speed-ups with CIs (wall, CPU), FLOP fraction, KV ratio, vs static."""
    return pd.DataFrame({
        "model": table.model, "B": table.batch_size, "T": table.prompt_len, "setting": table.setting,
        "skipped": table.skipped_share.map("{:.3f}".format), "flops": table.flop_fraction.map("{:.3f}".format),
        "e2e": [_ci(r, "speedup") for _, r in table.iterrows()],
        "prefill": [_ci(r, "speedup_prefill") for _, r in table.iterrows()],
        "decode": [_ci(r, "speedup_decode") for _, r in table.iterrows()],
        "cpu e2e": [_ci(r, "cpu_speedup") for _, r in table.iterrows()],
        "kv": table.kv_ratio.map("{:.3f}".format),
        "vs static": ["" if pd.isna(r.vs_static) else _ci(r, "vs_static") for _, r in table.iterrows()],
    })


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = argparse.BooleanOptionalAction
    p.add_argument("--quick", action="store_true", help="SmolLM2, 512-token prompts, batch 8, 64 new tokens, the six "
                   "granularities (real) and dense, 5 repeats; add --static / --masked / --moe for more")
    p.add_argument("--smoke", action="store_true", help="tiny random models and workloads (seconds; meaningless)")
    p.add_argument("--estimate", action="store_true", help="print the plan and its estimated runtime, run nothing")
    p.add_argument("--models", nargs="+", default=None, help="bundled models (default smollm2-135m gemma3-270m)")
    p.add_argument("--moe", action=flag, default=None, help=f"also the MoE setting ({MOE}); default on, off in --quick")
    p.add_argument("--static", action=flag, default=None, help="static drop of each target; default on, off in --quick")
    p.add_argument("--masked", action=flag, default=None, help="masked mode of each router; default on, off in --quick")
    p.add_argument("--copy-controls", action="store_true",
                   help="also time two copies of the dense model (a deep copy with its own weight tensors, as the "
                        "notebooks' routed and merged models are, and a copy sharing the weights): null controls")
    p.add_argument("--settings", nargs="+", default=None,
                   help="time only these of the built settings (and dense), e.g. dense attn_token 'attn_token masked' "
                        "'attn static drop': fewer settings give more rounds in the same time")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    p.add_argument("--capacity", type=float, default=0.5)
    p.add_argument("--moe-capacity", type=float, default=0.75, help="share of expert assignments executed (paper: 0.75)")
    p.add_argument("--num-layers", type=int, default=None, help="routed layers (default half, rounded up to even)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=None, help="default 128 512")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64")
    p.add_argument("--pool", type=int, default=None, help="prompts per workload (a multiple of every batch size; 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after one warm-up (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default), recorded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--name", default=None, help="result file name (default speed_<quick|full|smoke>_<device>)")
    p.add_argument("--out", default=str(ROOT / "results" / "speed"))
    args = p.parse_args(argv)
    if args.quick and args.smoke:
        p.error("--quick and --smoke exclude each other")
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    defaults = {
        "full": dict(models=["smollm2-135m", "gemma3-270m"], moe=True, static=True, masked=True, batch_sizes=[1, 8],
                     prompt_lens=[128, 512], new_tokens=64, pool=8, repeats=5),
        "quick": dict(models=["smollm2-135m"], moe=False, static=False, masked=False, batch_sizes=[8],
                      prompt_lens=[512], new_tokens=64, pool=8, repeats=5),
        "smoke": dict(models=["smollm2-135m"], moe=True, static=True, masked=True, batch_sizes=[2], prompt_lens=[16],
                      new_tokens=3, pool=2, repeats=1),
    }[size]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.size = size
    if any(args.pool % b for b in args.batch_sizes):
        p.error(f"--pool {args.pool} must be a multiple of every batch size {args.batch_sizes}")
    if args.num_layers is not None and args.num_layers * (1 - args.capacity) != round(args.num_layers * (1 - args.capacity)):
        p.error(f"--num-layers {args.num_layers} x (1 - capacity {args.capacity}) must be whole layers, so that static "
                "drop skips the same share as the routers")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)  # recorded in run.json either way
    models = list(args.models) + ([MOE] if args.moe else [])
    estimates = {}
    for name in models:
        config = load(name, args).config if args.smoke or name == MOE else _config(name)
        estimates[name] = estimate_seconds(config, args, moe=name == MOE)
        print(f"{name}: {settings_count(args, name == MOE)} settings x prompts {args.prompt_lens} x batch "
              f"{args.batch_sizes}, {args.pool} prompts, {args.new_tokens} new tokens, 1 + {args.repeats} rounds: "
              f"~{estimates[name] / 60:.0f} min")
    print(f"estimated total ~{sum(estimates.values()) / 60:.0f} min on the reference 2-core machine (+-30%), "
          f"{torch.get_num_threads()} threads")
    if args.estimate:
        return None

    start, provenance = time.time(), run_info()  # provenance at the start: the code this process imported
    tables = []
    for name in models:
        model = load(name, args)
        for prompt_len in args.prompt_lens:
            pool = prompt_pool(model.config.vocab_size, args.pool, prompt_len, seed=args.seed)
            settings = selected((moe_settings if name == MOE else dense_settings)(model, pool, args), args.settings)
            for batch_size in args.batch_sizes:
                found = compare_settings(settings, pool, batch_size, args.new_tokens, repeats=args.repeats)
                tables.append(with_ratios(found, name))
                print(summary(tables[-1]).to_markdown(index=False), flush=True)
            del settings
        del model
    table = pd.concat(tables, ignore_index=True)
    short = summary(table)
    name = args.name or f"speed_{args.size}_{args.device or 'cpu'}"
    out = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/speed.py", *(argv if argv is not None
                                                                                       else sys.argv[1:])])
    record = {"command": command, "args": vars(args), "wall_time_s": time.time() - start,
              "estimated_s": sum(estimates.values()), "torch_threads": torch.get_num_threads(), "run": provenance}
    write_table(table.drop(columns=["round_generate_s"]), out, name)
    write_atomic(out / f"{name}_summary.md", short.to_markdown(index=False) + "\n")
    write_json(out / f"{name}.json", {**record, "rows": table.to_dict(orient="records")})
    write_json(out / "run.json", record)
    return table


def _config(name: str):
    """A bundled model's config without loading its weights."""
    from transformers import AutoConfig

    from routertune_lib.models import BUILTIN_MODELS, convert_builtin, builtin_cache_path

    path = builtin_cache_path(name)
    if name in BUILTIN_MODELS and not path.is_dir():
        convert_builtin(BUILTIN_MODELS[name], path)
    return AutoConfig.from_pretrained(path if name in BUILTIN_MODELS else name)


if __name__ == "__main__":
    main()
