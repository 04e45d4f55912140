"""Fidelity of a routed model to its dense model on held-out text: mean next-token KL and sliding-window
perplexity, and a context that makes a routed model execute every layer (its dense reference)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .requests import model_max_length, pad_token_id, tok_encode
from .scoring import model_device, right_pad


@contextlib.contextmanager
def all_layers_executed(model):
    """Temporarily set every router threshold to 0 so a routed model executes every layer (= the dense model;
    statically dropped layers stay dropped). No-op for a model without routers."""
    if getattr(model, "routertune", None) is None:
        yield model
        return
    from ..routing import routed_layers, set_thresholds

    old = {i: layer.routing.threshold for i, layer in routed_layers(model).items()}
    set_thresholds(model, 0.0)
    try:
        yield model
    finally:
        set_thresholds(model, old)


def _text_batches(tokenizer, texts, max_length, batch_size):
    enc = [tok_encode(tokenizer, t)[:max_length] for t in texts]
    enc = [e for e in enc if len(e) >= 2]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    for b in range(0, len(order), batch_size):
        yield [enc[i] for i in order[b : b + batch_size]]


@torch.no_grad()
def mean_kl(
    model_dense,
    model_routed,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 512,
    batch_size: int = 8,
    dense_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> float:
    """Mean over real next-token positions of KL(p_dense || p_routed).

    Pass two models (dense and a routed copy), or the same routed model twice with
    ``dense_context=lambda: all_layers_executed(model)`` to get the dense reference from it.
    Each text is truncated to ``max_length`` tokens; sequences run full-length (``share_context`` does not apply).
    """
    device = model_device(model_routed)
    pad = pad_token_id(tokenizer)
    total, count = 0.0, 0
    for seqs in tqdm(list(_text_batches(tokenizer, texts, max_length, batch_size)), desc="kl", leave=False):
        ids, mask = right_pad(seqs, pad, device)
        with dense_context() if dense_context else contextlib.nullcontext():
            p = F.log_softmax(model_dense(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        q = F.log_softmax(model_routed(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        kl = (p.exp() * (p - q)).sum(-1)  # [B, T]
        m = mask.bool()
        total += float(kl[m].sum())
        count += int(m.sum())
    return total / max(count, 1)


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str] | str, max_length: int | None = None,
               stride: int | None = None, join: str = "\n\n") -> dict:
    """Sliding-window perplexity of ``join.join(texts)`` (the Hugging Face recipe).

    Windows of ``max_length`` tokens advance by ``stride`` (default ``max_length``); each token is scored once,
    with up to ``max_length - stride`` tokens of preceding context. Returns ``{"ppl", "nll", "tokens"}``.
    """
    device = model_device(model)
    max_length = max_length or min(model_max_length(model, tokenizer), 2048)
    stride = stride or max_length
    text = texts if isinstance(texts, str) else join.join(texts)
    ids = torch.tensor(tok_encode(tokenizer, text), device=device)[None]
    nll, n_tok, prev_end = 0.0, 0, 0
    for begin in tqdm(range(0, ids.shape[1], stride), desc="perplexity", leave=False):
        end = min(begin + max_length, ids.shape[1])
        window = ids[:, begin:end]
        logp = F.log_softmax(model(input_ids=window, use_cache=False).logits.float(), -1)[0, :-1]
        tgt = window[0, 1:]
        first_new = max(prev_end - begin, 0)  # positions of tgt already scored by the previous window
        lp = logp.gather(-1, tgt[:, None])[:, 0][max(first_new - 1, 0):]
        nll -= float(lp.sum())
        n_tok += lp.numel()
        prev_end = end
        if end == ids.shape[1]:
            break
    return {"ppl": math.exp(nll / max(n_tok, 1)), "nll": nll / max(n_tok, 1), "tokens": n_tok}
