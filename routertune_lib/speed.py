"""Wall-clock speed and KV-cache memory of dense, routed (real / masked) and static-drop models, side by side.

Every setting runs the same prompts with the same generation length; settings are interleaved within each repeat
(so drifting machine load hits all of them alike) and the median over repeats is reported.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .routing import routing_mode


@dataclass
class SpeedRow:
    """One setting on one workload. Times in seconds (median over repeats), summed over the prompt pool."""

    setting: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_s: float
    generate_s: float
    prefill_tok_s: float  # prompt tokens / prefill_s
    decode_tok_s: float  # generated tokens / (generate_s - prefill_s)
    kv_bytes: int  # KV-cache bytes after prefill, summed over the pool's batches
    skipped_share: float  # skipped (layer, input) executions of the gated modules / all layers' (0.0 for dense)

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _run_pool(model: nn.Module, prompts: torch.Tensor, batch_size: int, new_tokens: int) -> dict:
    """Prefill and full generation of every batch of ``prompts``; returns summed times, KV bytes, routing counts."""
    device = next(model.parameters()).device
    prefill = generate = 0.0
    kv = gated_layers = 0
    executed = total = 0.0
    for start in range(0, prompts.shape[0], batch_size):
        ids = prompts[start : start + batch_size].to(device)
        mask = torch.ones_like(ids)
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        _sync(device)
        prefill += time.perf_counter() - t0
        kv += kv_cache_bytes(out.cache)
        counts = out.routing.counts() if hasattr(out, "routing") else {}  # {layer: (executed, total)}, routed only
        executed += sum(e for e, _ in counts.values())
        total += sum(n for _, n in counts.values())
        gated_layers = len(counts)
        del out
        t0 = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
        _sync(device)
        generate += time.perf_counter() - t0
    # inputs one layer sees = total / gated_layers; share of all layers' executions that were skipped:
    skipped = (total - executed) * gated_layers / (model.config.num_hidden_layers * total) if total else 0.0
    return {"prefill": prefill, "generate": generate, "kv": kv, "skipped": skipped}


def compare_settings(
    settings: dict[str, tuple[nn.Module, str | None]],
    prompts: torch.Tensor,
    batch_size: int,
    new_tokens: int,
    repeats: int = 3,
    warmup: int = 1,
) -> list[SpeedRow]:
    """Time each setting ``name -> (model, routing mode or None)`` on ``prompts`` ``[P, T]`` in batches.

    Warm-up runs are discarded; then ``repeats`` rounds run every setting once each, in the same order.
    """
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for r in tqdm(range(warmup + repeats), desc=f"B={batch_size} T={prompts.shape[1]}", leave=False):
        for name, (model, mode) in settings.items():
            with routing_mode(model, mode) if mode else contextlib.nullcontext():
                result = _run_pool(model, prompts, batch_size, new_tokens)
            if r >= warmup:
                runs[name].append(result)
    rows = []
    P, T = prompts.shape
    for name, results in runs.items():
        prefill = statistics.median(x["prefill"] for x in results)
        generate = statistics.median(x["generate"] for x in results)
        rows.append(
            SpeedRow(
                setting=name,
                batch_size=batch_size,
                prompt_len=T,
                new_tokens=new_tokens,
                prefill_s=prefill,
                generate_s=generate,
                prefill_tok_s=P * T / prefill,
                decode_tok_s=P * new_tokens / max(generate - prefill, 1e-9),
                kv_bytes=results[0]["kv"],
                skipped_share=results[0]["skipped"],
            )
        )
    return rows
