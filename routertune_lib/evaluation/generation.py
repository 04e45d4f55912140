"""Greedy generation with stop strings (lm-eval ``generate_until``) and the generative exact-match task runner."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .requests import fewshot_sampler, pad_token_id, tok_encode
from .results import TaskResult, mean_stderr
from .scoring import RoutingStats, left_pad, model_device
from .tasks import GenerativeTask, normalize_answer, task_docs

# -- generation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_until(model, tokenizer, prompts: Sequence[str], until: Sequence[str], max_new_tokens: int = 256,
                   batch_size: int = 16, max_length: int = 2048, stats: RoutingStats | None = None) -> list[str]:
    """Greedy continuation of each prompt, cut at the first stop string (left-padded batches, longest first).

    stats: if given, accumulates the routing decisions of the generation (routed models): every decision of each
    batch's prefill, then only fresh token-level decisions of the decode steps (a sequence-level decision is made once
    at prefill and reused), the counting of :func:`loglikelihoods`.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = model_device(model)
    pad = pad_token_id(tokenizer)
    enc = [tok_encode(tokenizer, p)[-(max_length - max_new_tokens):] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    out: list[str | None] = [None] * len(prompts)

    class _Stop(StoppingCriteria):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores, **kw):
            texts = tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=False)
            return torch.tensor([any(s in t for s in until) for t in texts], device=input_ids.device)

    forwards = [0]  # forwards of the current generate call: the first is the prefill

    def count(module, args, output):  # runs after the routing hooks, which put the trace on the output
        stats.add(output, token_level_only=forwards[0] > 0)
        forwards[0] += 1

    handle = model.register_forward_hook(count) if stats is not None else None
    try:
        for b in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
            chunk = order[b : b + batch_size]
            ids, mask = left_pad([enc[i] for i in chunk], pad, device)
            forwards[0] = 0
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, stopping_criteria=StoppingCriteriaList([_Stop(ids.shape[1])]),
                temperature=None, top_p=None, top_k=None,
            )
            texts = tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=False)
            for i, t in zip(chunk, texts):
                for s in until:
                    t = t.split(s)[0]
                out[i] = t
    finally:
        if handle is not None:
            handle.remove()
    return out  # type: ignore[return-value]


def generative_prompts(task: GenerativeTask, shots: int, limit: int | None, seed: int):
    """``(doc ids, docs, prompts)``: the evaluated docs of ``task`` (the seeded ``limit`` subset) and the
    ``shots``-shot prompts greedy generation starts from (:func:`run_generative`; the fidelity pass scores the gold
    answer after the same prompts)."""
    idx, docs = task_docs(task.name, limit, seed)
    sampler = fewshot_sampler(task, shots, seed)
    return idx, docs, [task.prompt(d, sampler.sample(shots, d) if sampler else ()) for d in docs]


def run_generative(model, tokenizer, task: GenerativeTask, shots, limit, seed, batch_size, max_length):
    idx, docs, prompts = generative_prompts(task, shots, limit, seed)
    stats = RoutingStats()
    gens = generate_until(model, tokenizer, prompts, task.until, task.max_new_tokens, batch_size, max_length, stats)
    records = []
    for i, d, g in zip(idx, docs, gens):
        pred, gold = normalize_answer(task.extract(g)), normalize_answer(task.doc_to_answer(d))
        records.append({"task": task.name, "doc_id": int(i), "generation": g, "pred": pred, "gold": gold,
                        "exact_match": float(pred == gold)})
    m, s = mean_stderr([r["exact_match"] for r in records])
    return TaskResult(task.name, "exact_match", shots, len(records), {"exact_match": m}, {"exact_match": s},
                      chance=0.0, records=records, routing={k: list(v) for k, v in stats.counts.items()})

