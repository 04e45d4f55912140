"""Wall-clock and CPU-time speed, KV-cache memory and executed FLOPs of dense, routed (real / masked) and static-drop
models, side by side, with confidence intervals.

Method (``compare_settings``): every setting is built before timing; one warm-up round runs each setting once
(untimed; it also counts the executed FLOPs through the routing traces); then ``repeats`` rounds run every setting
once each, in the same order (A B C A B C ...), so that drifting machine load hits all settings alike. Each setting
reports its median over rounds; each speed-up is the median over rounds of the ratio to the baseline in the same
round, with a distribution-free confidence interval for that median from the order statistics of the per-round ratios
(:func:`median_ci`; with 5 rounds it is [min, max], coverage 93.75%). Process CPU time (``time.process_time``, all
threads) is reported beside wall time: it is less sensitive to other jobs, and when the two disagree the machine was
busy. Generation length is fixed (``min_new_tokens = max_new_tokens``), so EOS cannot cut a setting short.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .flops import record_flops
from .routing import routing_mode

PHASES = ("prefill", "decode", "generate")


@dataclass
class SpeedRow:
    """One setting on one workload: times in seconds, summed over the prompt pool, median over rounds.

    prefill: from the ``generate`` call to the end of its first forward (the prompt; scores the last position only);
    decode: the other ``new_tokens - 1`` forwards; generate: both. ``*_cpu_s``: process CPU time of the same phases (all threads).
    speedup*: median over rounds of baseline time / this setting's time in the same round (wall: ``speedup``,
    CPU: ``cpu_speedup``; e2e, ``_prefill``, ``_decode``), with ``_ci_low`` / ``_ci_high`` from :func:`median_ci`
    at coverage ``ci_coverage`` over ``repeats`` rounds. flop_fraction*: executed / dense FLOPs of the same
    generation (``routertune_lib.flops``), deterministic.
    """

    setting: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_s: float
    generate_s: float
    prefill_tok_s: float  # prompt tokens / prefill_s
    decode_tok_s: float  # tokens made by decode forwards / decode_s
    kv_bytes: int  # KV-cache bytes after prefill, summed over the pool's batches
    skipped_share: float  # skipped (layer, input) executions of the gated modules at prefill / all layers' (dense: 0)
    decode_s: float = math.nan
    prefill_cpu_s: float = math.nan
    decode_cpu_s: float = math.nan
    generate_cpu_s: float = math.nan
    speedup: float = math.nan
    speedup_ci_low: float = math.nan
    speedup_ci_high: float = math.nan
    speedup_prefill: float = math.nan
    speedup_prefill_ci_low: float = math.nan
    speedup_prefill_ci_high: float = math.nan
    speedup_decode: float = math.nan
    speedup_decode_ci_low: float = math.nan
    speedup_decode_ci_high: float = math.nan
    cpu_speedup: float = math.nan
    cpu_speedup_ci_low: float = math.nan
    cpu_speedup_ci_high: float = math.nan
    cpu_speedup_prefill: float = math.nan
    cpu_speedup_prefill_ci_low: float = math.nan
    cpu_speedup_prefill_ci_high: float = math.nan
    cpu_speedup_decode: float = math.nan
    cpu_speedup_decode_ci_low: float = math.nan
    cpu_speedup_decode_ci_high: float = math.nan
    ci_coverage: float = math.nan
    flop_fraction: float = math.nan
    flop_fraction_prefill: float = math.nan
    flop_fraction_decode: float = math.nan
    repeats: int = 0
    threads: int = 0
    round_generate_s: tuple[float, ...] = ()  # wall generate_s of each timed round, for paired ratios between settings

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_pool(vocab_size: int, num_prompts: int, prompt_len: int, seed: int = 0, low: int = 10) -> torch.Tensor:
    """``[num_prompts, prompt_len]`` random token ids in ``[low, vocab_size)`` (no special tokens), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (num_prompts, prompt_len), generator=g)


def text_prompt_pool(tokenizer, texts: Sequence[str], num_prompts: int, prompt_len: int) -> torch.Tensor:
    """``[num_prompts, prompt_len]`` token ids of real text, for timing routed models on inputs that route as the
    evaluation's do: one timing prompt per text (a sequence-level router decides on one prompt, so several texts are
    never joined into one).

    Row ``i`` is ``texts[i]`` encoded as the evaluation encodes a context (the ids the tokenizer adds to any text,
    e.g. Gemma's ``<bos>``, then the text), keeping the prefix and the last ``prompt_len - len(prefix)`` text tokens.
    Raises ``ValueError`` when there are fewer than ``num_prompts`` texts or one is shorter than ``prompt_len``.
    """
    prefix = tokenizer("")["input_ids"]
    body = prompt_len - len(prefix)
    if num_prompts < 1 or body < 1 or len(texts) < num_prompts:
        raise ValueError(f"text_prompt_pool: {len(texts)} texts for num_prompts={num_prompts} prompts of "
                         f"prompt_len={prompt_len} tokens (the tokenizer adds {len(prefix)}): pass at least "
                         "num_prompts texts and num_prompts >= 1, prompt_len > the tokenizer's prefix")
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:num_prompts]]
    shortest = min(range(num_prompts), key=lambda i: len(rows[i]))
    if len(rows[shortest]) < body:
        raise ValueError(f"text_prompt_pool: text {shortest} has {len(rows[shortest]) + len(prefix)} tokens, fewer "
                         f"than prompt_len={prompt_len}: pass longer texts (e.g. evaluation.task_prompts(..., "
                         "num_fewshot=k) with more few-shot examples) or a smaller prompt_len")
    return torch.tensor([prefix + r[len(r) - body:] for r in rows])


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a ``transformers`` cache."""
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
        if getattr(layer, "is_initialized", False)
    )


def median_ci(values, level: float = 0.95) -> tuple[float, float, float, float]:
    """``(median, low, high, coverage)`` of ``values`` (e.g. per-round speed-ups): a distribution-free confidence
    interval for the median from order statistics, ``[x_(k), x_(n+1-k)]`` with the largest ``k`` whose coverage
    ``1 - 2 P(Binomial(n, 1/2) < k)`` is at least ``level``; below 6 values no ``k`` reaches 95% and the interval is
    ``[min, max]`` with coverage ``1 - 2^(1-n)`` (93.75% for 5 rounds). Assumes independent rounds."""
    x = sorted(float(v) for v in values)
    n = len(x)
    if n == 0:
        raise ValueError("median_ci needs at least one value")

    def coverage(k):  # of [x_(k), x_(n+1-k)], 1-based k
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return statistics.median(x), x[k - 1], x[n - k], coverage(k)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds after the device finished its queued work."""
    _sync(device)
    return time.perf_counter(), time.process_time()


@torch.no_grad()
def timed_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, flops=None) -> dict:
    """One greedy ``generate`` of exactly ``new_tokens`` tokens, timed per phase (the first forward is the prefill).

    Returns wall and CPU seconds per phase, the KV bytes after prefill, the prefill's routing counts and, when a
    ``record_flops`` counter is given, its (executed, dense) FLOPs after the prefill.
    """
    device = ids.device
    marks: dict = {}

    def prefill_done(module, args, kwargs, output):
        if "prefill" not in marks:
            marks["prefill"] = _now(device)
            cache, marks["trace"] = getattr(output, "cache", None), getattr(output, "routing", None)
            marks["kv"] = kv_cache_bytes(cache) if cache is not None else 0
            if flops is not None:
                marks["flops"] = (flops.executed, flops.dense)

    handle = model.register_forward_hook(prefill_done, with_kwargs=True)  # after routing's and record_flops' hooks
    try:
        start = _now(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=model.config.pad_token_id or 0)
        end = _now(device)
    finally:
        handle.remove()
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens instead of {new_tokens}")
    mid = marks["prefill"]
    result = {"prefill": mid[0] - start[0], "decode": end[0] - mid[0], "generate": end[0] - start[0],
              "prefill_cpu": mid[1] - start[1], "decode_cpu": end[1] - mid[1], "generate_cpu": end[1] - start[1],
              "kv": marks["kv"], "counts": marks["trace"].counts() if marks["trace"] is not None else {}}
    if flops is not None:
        result["flops_prefill"] = marks["flops"]
    return result


def _run_pool(model: nn.Module, prompts: torch.Tensor, batch_size: int, new_tokens: int,
              count_flops: bool = False) -> dict:
    """Generation for every batch of ``prompts``; returns summed phase times, KV bytes, skipped share and, with
    ``count_flops``, the executed FLOP fractions (``flop_fraction``, ``_prefill``, ``_decode``)."""
    device = next(model.parameters()).device
    total: dict[str, float] = {}
    executed = inputs = 0.0
    gated_layers = 0
    prefill = [0.0, 0.0]  # executed, dense FLOPs of the prefills
    with record_flops(model) if count_flops else contextlib.nullcontext() as counter:
        for start in range(0, prompts.shape[0], batch_size):
            before = (counter.executed, counter.dense) if counter is not None else None
            r = timed_generate(model, prompts[start : start + batch_size].to(device), new_tokens, counter)
            for key in ("kv", *PHASES, *(f"{p}_cpu" for p in PHASES)):
                total[key] = total.get(key, 0.0) + r[key]
            executed += sum(e for e, _ in r["counts"].values())
            inputs += sum(n for _, n in r["counts"].values())
            gated_layers = len(r["counts"])
            if counter is not None:
                prefill = [prefill[i] + r["flops_prefill"][i] - before[i] for i in range(2)]
    if counter is not None:
        total["flop_fraction"] = counter.fraction()
        total["flop_fraction_prefill"] = prefill[0] / prefill[1]
        total["flop_fraction_decode"] = (counter.executed - prefill[0]) / (counter.dense - prefill[1])
    # inputs one layer sees = inputs / gated_layers; share of all layers' executions that were skipped:
    total["skipped"] = (inputs - executed) * gated_layers / (model.config.num_hidden_layers * inputs) if inputs else 0.0
    return total


def compare_settings(
    settings: dict[str, tuple[nn.Module, str | None]],
    prompts: torch.Tensor,
    batch_size: int,
    new_tokens: int,
    repeats: int = 5,
    warmup: int = 1,
    baseline: str | None = None,
) -> list[SpeedRow]:
    """Time each setting ``name -> (model, routing mode or None)`` on ``prompts`` ``[P, T]`` in batches.

    Runs ``warmup`` untimed rounds (the first counts FLOPs), then ``repeats`` interleaved timed rounds (module
    docstring). Speed-ups are relative to ``baseline`` (default: the first setting), round by round.
    Raises ``ValueError`` for fewer than 1 repeat / warm-up, fewer than 2 new tokens or an unknown baseline.
    """
    baseline = next(iter(settings)) if baseline is None else baseline
    if baseline not in settings:
        raise ValueError(f"compare_settings: baseline {baseline!r} is not a setting; settings: {list(settings)}")
    if repeats < 1 or warmup < 1:
        raise ValueError(f"compare_settings needs repeats >= 1 and warmup >= 1 (the warm-up counts FLOPs), got "
                         f"repeats={repeats}, warmup={warmup}")
    if new_tokens < 2:
        raise ValueError(f"compare_settings needs new_tokens >= 2 (one prefill and at least one decode step), got "
                         f"{new_tokens}")
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    flops: dict[str, dict] = {}
    for r in tqdm(range(warmup + repeats), desc=f"B={batch_size} T={prompts.shape[1]}", leave=False):
        for name, (model, mode) in settings.items():
            with routing_mode(model, mode) if mode else contextlib.nullcontext():
                result = _run_pool(model, prompts, batch_size, new_tokens, count_flops=r == 0)
            if r == 0:
                flops[name] = result
            if r >= warmup:
                runs[name].append(result)
    P, T = prompts.shape
    threads = torch.get_num_threads()
    rows = []
    for name, results in runs.items():
        med = {key: statistics.median(x[key] for x in results) for key in results[0] if key != "kv"}
        ratios = {}
        for prefix, unit in (("speedup", ""), ("cpu_speedup", "_cpu")):
            for phase, suffix in (("generate", ""), ("prefill", "_prefill"), ("decode", "_decode")):
                per_round = [b[phase + unit] / x[phase + unit] for b, x in zip(runs[baseline], results)]
                point, low, high, coverage = median_ci(per_round)
                col = prefix + suffix
                ratios.update({col: point, f"{col}_ci_low": low, f"{col}_ci_high": high})
        rows.append(SpeedRow(
            setting=name, batch_size=batch_size, prompt_len=T, new_tokens=new_tokens,
            prefill_s=med["prefill"], generate_s=med["generate"], prefill_tok_s=P * T / med["prefill"],
            decode_tok_s=P * (new_tokens - 1) / med["decode"], kv_bytes=int(results[0]["kv"]),
            skipped_share=results[0]["skipped"], decode_s=med["decode"], prefill_cpu_s=med["prefill_cpu"],
            decode_cpu_s=med["decode_cpu"], generate_cpu_s=med["generate_cpu"], **ratios, ci_coverage=coverage,
            flop_fraction=flops[name]["flop_fraction"], flop_fraction_prefill=flops[name]["flop_fraction_prefill"],
            flop_fraction_decode=flops[name]["flop_fraction_decode"], repeats=repeats, threads=threads,
            round_generate_s=tuple(x["generate"] for x in results),
        ))
    return rows
