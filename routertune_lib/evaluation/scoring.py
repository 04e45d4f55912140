"""The scoring engine: summed log-likelihoods of ``(context, continuation)`` token requests, for dense and routed
models, and the routing statistics of the forwards that computed them.

:func:`loglikelihoods` groups requests by context. Contexts that share a long token prefix (MMLU's ``first_n``
few-shot examples: one per subject) form a family whose prefix runs once (where that is exact:
:func:`prefix_sharing_exact`). Contexts are left-padded and run once (``logits_to_keep=1`` scores every choice's
first token); when a choice has more tokens, rows of the context's KV cache are selected per choice and only the
continuation tokens are run, so the LM head runs on continuation positions only. Every forward's rows are sorted by
length and cut by :func:`length_chunks`, an exact minimum of padded tokens plus a fixed cost per forward. For a dense
model this equals scoring each ``context + continuation`` separately (up to float rounding; tested).

Routing semantics: with ``share_context=True`` (default) a *sequence-level* router decides on the context alone at
prefill and the continuation reuses that decision from the cache -- the paper's deployment semantics (decide on the
prompt, then decode). ``share_context=False`` runs every ``context + continuation`` as one sequence, so a
sequence-level router decides on the whole sequence (what lm-eval's HFLM would do with a routed model). Token-level
routers give the same decisions either way (a token's decision depends only on its causal hidden state).
Routing statistics: executed/total counts of every fresh decision (``output.routing.counts()``), summed over
forwards: sequence-level counts one per context (prefill), token-level one per real token computed (a prefix shared
by several contexts is computed, and counted, once).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

TokenFn = Callable[[int, int, torch.Tensor], None]  # (request index, first token index, log-probs [n, V])

class RoutingStats:
    """Executed/total counts per routed layer, summed over forwards."""

    def __init__(self, counts: dict | None = None):
        self.counts: dict[int, list[float]] = {int(k): list(v) for k, v in (counts or {}).items()}

    def add(self, output, token_level_only: bool = False) -> None:
        trace = getattr(output, "routing", None) if not isinstance(output, dict) else output.get("routing")
        if trace is None:
            return
        self.merge(RoutingStats(trace.counts(token_level_only)))

    def merge(self, other: "RoutingStats") -> None:
        for k, (e, t) in other.counts.items():
            c = self.counts.setdefault(k, [0.0, 0.0])
            c[0] += e
            c[1] += t

    def summary(self) -> dict:
        """``{"layers": {layer: executed fraction}, "overall": fraction over all layers}`` ({} for dense models)."""
        if not self.counts:
            return {}
        ex = sum(c[0] for c in self.counts.values())
        tot = sum(c[1] for c in self.counts.values())
        return {
            "layers": {k: c[0] / max(c[1], 1.0) for k, c in sorted(self.counts.items())},
            "overall": ex / max(tot, 1.0),
            "counts": {k: tuple(c) for k, c in sorted(self.counts.items())},
        }


def _select_rows(cache, index: torch.Tensor):
    """A new ``DynamicCache`` holding batch rows ``index`` (``[R]``, repeats allowed) of ``cache``; ``cache`` is left
    unchanged (its tensors are not copied where a layer is not selected from).

    Handles routertune's compact cache layers (K/V stored for kept rows only, and the decision per row).
    """
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        keep_rows = getattr(layer, "keep_rows", None)
        filled = getattr(layer, "is_initialized", False) and layer.keys.numel()
        if filled and keep_rows is not None and getattr(layer, "compact", False) and layer.keys.dim() == 4:
            pos = torch.cumsum(keep_rows.long(), 0) - 1
            src = pos[index][keep_rows[index]]
            layer.keys, layer.values = layer.keys[src], layer.values[src]
        elif filled:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        if keep_rows is not None:
            rows = keep_rows[index]
            layer.set_decision(rows, rows.nonzero().squeeze(1), layer.keep[index])
    return new


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` ids and mask, left padded."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return pos if offset is None else pos + offset[:, None]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# A forward's fixed cost (dispatch over every layer, small kernels), in padded tokens: ``length_chunks`` starts a new
# forward where padding more rows to the chunk's longest would cost more. Accelerators pad almost for free.
FORWARD_COST_TOKENS = {"cpu": 64}
_FORWARD_COST_TOKENS_ACCELERATOR = 1024
ROWS_PER_BATCH_SIZE = 8  # short sequences: at most this many times batch_size rows in one forward


def length_chunks(lengths: Sequence[int], max_tokens: int, forward_cost: float, max_rows: int) -> list[range]:
    """Cut items sorted by length (descending) into consecutive chunks that minimise
    ``sum(forward_cost + rows * longest)``, the padded tokens a chunk computes plus a fixed cost per forward, with
    ``rows * longest <= max_tokens`` (a longer item gets a chunk of its own) and ``rows <= max_rows``.
    An exact dynamic programme, ``O(len(lengths) * max_rows)``."""
    n = len(lengths)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end - 1, max(0, end - max_rows) - 1, -1):
            rows = end - start
            if rows > 1 and rows * lengths[start] > max_tokens:
                break  # earlier starts are longer and hold more rows
            cost = best[start] + forward_cost + rows * lengths[start]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks, end = [], n
    while end:
        chunks.append(range(cut[end], end))
        end = cut[end]
    return chunks[::-1]


def _continuation_scores(logits: torch.Tensor, where: torch.Tensor, conts: Sequence[Sequence[int]],
                         token_fn: TokenFn | None = None, ids: Sequence[int] = (), start: int = 0):
    """``[(sum log p, all greedy)]`` per continuation. ``logits`` ``[B, T, V]``; ``where`` ``[B, T]`` bool, True at the
    positions that predict ``conts[b]``'s tokens, in order. Only those positions are normalised (logsumexp).
    ``token_fn(ids[b], start, log-probs [len(conts[b]), V])`` is called per continuation when given."""
    targets = torch.tensor([t for c in conts for t in c], device=logits.device)
    x = logits[where].float()  # [N, V]
    lse = torch.logsumexp(x, -1)
    lp = x.gather(-1, targets[:, None])[:, 0] - lse
    hit = x.argmax(-1) == targets
    sizes = [len(c) for c in conts]
    if token_fn is not None:
        for i, piece in zip(ids, (x - lse[:, None]).split(sizes)):
            token_fn(i, start, piece)
    return [(float(a.sum()), bool(b.all())) for a, b in zip(lp.split(sizes), hit.split(sizes))]


def prefix_sharing_exact(model, longest: int) -> bool:
    """Whether contexts that share a token prefix may share its computation, for sequences up to ``longest`` tokens.

    Not with trained sequence-level routers (their decision depends on the whole context, so a prefix computed once
    would route differently), nor with sliding-window attention over more than its window (the padding between a
    shared prefix and each context moves the window, which counts cache slots)."""
    setup = getattr(model, "routertune", None)
    if setup is not None and setup.config.level == "sequence" and not setup.static:
        return False
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    return window is None or 2 * longest <= window


def prefix_families(contexts: Sequence[tuple], min_prefix: float) -> list[tuple[int, list[tuple]]]:
    """Group lexicographically sorted ``contexts`` into runs that share a token prefix: ``[(P, run)]``.

    ``P`` is the run's common prefix, capped so each member keeps at least one token of its own. A run grows while
    its saving, ``(members - 1) * P``, does not shrink and ``P >= min_prefix``; contexts in no such run come as
    ``(0, run)``. E.g. MMLU's ``first_n`` few-shot examples make one run per subject.
    """
    families: list[tuple[int, list[tuple]]] = []
    loose: list[tuple] = []

    def close(P, run):
        if len(run) > 1:
            families.append((P, run))
        else:
            loose.extend(run)

    run, P = [], 0
    for c in contexts:
        if run:
            common = next((k for k, (a, b) in enumerate(zip(run[0], c)) if a != b), min(len(run[0]), len(c)))
            p = min(P, common, len(c) - 1)
            if p >= min_prefix and len(run) * p >= (len(run) - 1) * P:
                run.append(c)
                P = p
                continue
            close(P, run)
        run, P = [c], len(c) - 1
    if run:
        close(P, run)
    return families + ([(0, loose)] if loose else [])


@torch.no_grad()
def loglikelihoods(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    pad_id: int = 0,
    share_context: bool = True,
    stats: RoutingStats | None = None,
    desc: str = "loglikelihood",
    forward_cost: float | None = None,
    token_fn: TokenFn | None = None,
) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), is_greedy)`` per ``(context_enc, continuation_enc)`` request.

    ``batch_size`` sets the size of a forward: at most ``batch_size`` times the longest context (prefill), the longest
    continuation (continuation pass, ``share_context``) or the longest sequence (``share_context=False``) in tokens,
    so shorter sequences run more rows per forward (up to ``ROWS_PER_BATCH_SIZE * batch_size``). Forwards are cut by
    ``length_chunks`` (``forward_cost``: ``FORWARD_COST_TOKENS`` of the device) so that little of the work is padding.
    Results do not depend on the order of ``requests`` or on ``batch_size`` (up to float rounding).
    token_fn: called as ``token_fn(i, start, logprobs)`` with the log-probabilities over the vocabulary
        (``[n, V]`` float32) at the positions that predict tokens ``start .. start + n`` of request ``i``'s
        continuation; a continuation may come in several pieces (e.g. its first token from the context's prefill).
    """
    device = model_device(model)
    if forward_cost is None:
        forward_cost = FORWARD_COST_TOKENS.get(device.type, _FORWARD_COST_TOKENS_ACCELERATOR)
    # truncate on the left like HFLM: keep the last max_length + 1 tokens of context + continuation
    reqs = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("empty continuation")
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {max_length}")
        keep = max_length + 1 - len(cont)
        reqs.append((tuple(ctx[-keep:]) if len(ctx) > keep else tuple(ctx), tuple(cont)))
    results: list[tuple[float, bool] | None] = [None] * len(reqs)
    pbar = tqdm(total=len(reqs), desc=desc, leave=False, disable=len(reqs) < 2)

    if not share_context:
        order = sorted(range(len(reqs)), key=lambda i: (-(len(reqs[i][0]) + len(reqs[i][1])), reqs[i]))
        lengths = [len(reqs[i][0]) + len(reqs[i][1]) - 1 for i in order]
        for part in length_chunks(lengths, batch_size * lengths[0], forward_cost, ROWS_PER_BATCH_SIZE * batch_size):
            chunk = [order[k] for k in part]
            ids, mask = left_pad([(reqs[i][0] + reqs[i][1])[:-1] for i in chunk], pad_id, device)
            K = max(len(reqs[i][1]) for i in chunk)
            out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False,
                        logits_to_keep=K)
            if stats is not None:
                stats.add(out)
            conts = [reqs[i][1] for i in chunk]
            where = torch.arange(K, device=device) >= K - torch.tensor([len(c) for c in conts], device=device)[:, None]
            for i, score in zip(chunk, _continuation_scores(out.logits, where, conts, token_fn, chunk)):
                results[i] = score
            pbar.update(len(chunk))
        pbar.close()
        return results  # type: ignore[return-value]

    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (ctx, _) in enumerate(reqs):
        groups[ctx].append(i)
    budget = {"context": batch_size * max((len(c) for c in groups), default=1),
              "continuation": batch_size * max((len(x) - 1 for _, x in reqs), default=1), "forward_cost": forward_cost,
              "max_rows": ROWS_PER_BATCH_SIZE * batch_size}
    if prefix_sharing_exact(model, max((len(c) + len(x) for c, x in reqs), default=0)):
        families = prefix_families(sorted(groups), min_prefix=forward_cost)
    else:
        families = [(0, sorted(groups))]
    for P, family in families:
        base = None
        if P:  # the family's shared prefix runs once; its cache is copied to every row of the family's prefills
            base = _new_cache(model)
            out = model(input_ids=torch.tensor([family[0][:P]], device=device), cache=base, use_cache=True,
                        logits_to_keep=1)
            if stats is not None:
                stats.add(out)
        contexts = sorted(family, key=lambda c: (-len(c), c))
        for block in length_chunks([len(c) for c in contexts], budget["context"], forward_cost, budget["max_rows"]):
            _score_block(model, [contexts[k] for k in block], P, base, groups, reqs, results, budget, pad_id, stats,
                         token_fn)
            pbar.update(sum(len(groups[contexts[k]]) for k in block))
    pbar.close()
    return results  # type: ignore[return-value]


def _score_block(model, batch, P, base, groups, reqs, results, budget, pad_id, stats, token_fn) -> None:
    """Score every request whose context is in ``batch`` (contexts sharing their first ``P`` tokens, whose cache is
    ``base``; ``P = 0``: nothing shared) into ``results``: one prefill of the contexts (after ``P``), then the
    choices' continuation tokens on rows of its cache, in forwards cut by ``length_chunks`` within ``budget``."""
    device = model_device(model)
    G = len(batch)
    ids, smask = left_pad([c[P:] for c in batch], pad_id, device)
    mask = torch.cat([smask.new_ones(G, P), smask], dim=1)  # [G, P + S]: the shared prefix, padding, the context
    cache = _select_rows(base, torch.zeros(G, dtype=torch.long, device=device)) if P else _new_cache(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)[:, P:], cache=cache,
                use_cache=True, logits_to_keep=1)
    if stats is not None:
        stats.add(out, token_level_only=bool(P))  # after a shared prefix, sequence decisions come from its cache
    members = [(g, i) for g, c in enumerate(batch) for i in groups[c]]
    rows = torch.tensor([g for g, _ in members], device=device)
    first = _continuation_scores(out.logits[rows], torch.ones(len(members), 1, dtype=torch.bool, device=device),
                                 [reqs[i][1][:1] for _, i in members], token_fn, [i for _, i in members])
    for (_, i), score in zip(members, first):
        results[i] = score
    # continuation pass: the choices sorted by length and cut by length_chunks, so little of it is padding;
    # each chunk attends to its rows of the shared prefix cache
    long = sorted((gi for gi in members if len(reqs[gi[1]][1]) > 1), key=lambda gi: (-len(reqs[gi[1]][1]), gi))
    for part in length_chunks([len(reqs[i][1]) - 1 for _, i in long], budget["continuation"], budget["forward_cost"],
                              budget["max_rows"]):
        chunk = [long[k] for k in part]
        index = torch.tensor([g for g, _ in chunk], device=device)
        cids, cmask = right_pad([reqs[i][1][:-1] for _, i in chunk], pad_id, device)
        out2 = model(
            input_ids=cids,
            attention_mask=torch.cat([mask[index], cmask], dim=1),
            position_ids=_positions(cmask, mask.sum(-1)[index]),
            cache=_select_rows(cache, index),
            use_cache=True,
        )
        if stats is not None:
            stats.add(out2, token_level_only=True)
        rest = _continuation_scores(out2.logits, cmask.bool(), [reqs[i][1][1:] for _, i in chunk], token_fn,
                                    [i for _, i in chunk], start=1)
        for (_, i), (ll, greedy) in zip(chunk, rest):
            results[i] = (results[i][0] + ll, results[i][1] and greedy)


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)

