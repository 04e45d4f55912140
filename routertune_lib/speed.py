"""Wall-clock speed and KV-cache memory of dense, routed (real / masked) and static-drop models, side by side.

Every setting runs the same prompts with the same generation length; settings are interleaved within each repeat
(so drifting machine load hits all of them alike) and the median over repeats is reported.
"""

from __future__ import annotations

import contextlib
import statistics
import time
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


def text_prompt_pool(tokenizer, texts, num_prompts: int, prompt_len: int) -> torch.Tensor:
    """``[num_prompts, prompt_len]`` token ids of real text, for timing routed models on inputs that route like text.

    ``texts`` are tokenized without special tokens, joined by blank lines and cut into consecutive chunks; each chunk
    starts with the ids the tokenizer adds to any text by default (e.g. Gemma's ``<bos>``; nothing for SmolLM2).
    Raises ``ValueError`` when ``texts`` hold too few tokens (pass more texts).
    """
    prefix = tokenizer("")["input_ids"]
    body = prompt_len - len(prefix)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    if body < 1 or len(ids) < num_prompts * body:
        raise ValueError(f"text_prompt_pool: {len(texts)} texts give {len(ids)} tokens; {num_prompts} prompts of "
                         f"{prompt_len} tokens need {num_prompts * max(body, 1)}: pass more texts")
    return torch.tensor([prefix + ids[i * body:(i + 1) * body] for i in range(num_prompts)])


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
