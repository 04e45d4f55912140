"""Fidelity of a model to its reference (a routed or dropped model to its dense base).

* Paired, per example, with bootstrap CIs (:func:`reference_outputs` once for the reference, then :func:`fidelity`:
  one pass per compared model): on multiple-choice tasks the change of the gold continuation's log-likelihood,
  agreement of the chosen answers and KL(reference || model) over the scored continuation tokens; on held-out text
  the perplexity ratio and the mean per-token KL; on generative (exact-match) tasks, teacher-forced, the change of
  the gold answer's log-likelihood and KL(reference || model) over its tokens, after the prompt generation starts
  from.
* Unpaired helpers on held-out text: :func:`mean_kl` (exact KL of two models in one joint pass) and sliding-window
  :func:`perplexity`; :func:`all_layers_executed` makes a routed model execute every layer (its dense reference).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import data as _data
from ..reporting import write_atomic
from .evaluator import HARNESS_VERSION, choice_record, model_fingerprint, multiple_choice_requests, resolve_shots
from .generation import generative_prompts
from .requests import encode_pair, model_max_length, pad_token_id, tok_encode
from .results import bootstrap_ci, task_average_ci
from .scoring import RoutingStats, loglikelihoods, model_device, right_pad
from .tasks import GenerativeTask, get_task

log = logging.getLogger(__name__)


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


# -- paired fidelity to a cached reference -----------------------------------------------------------------------
#
# ``reference_outputs`` runs the reference (the dense model) once and caches, per example, what a paired comparison
# needs; ``fidelity`` then costs one pass of the compared model. Multiple-choice tasks: the choices' log-likelihoods
# and the chosen answer, and per scored continuation token the reference's top-k log-probabilities, their token ids
# and the log of the remaining (tail) mass. Held-out text: the same per token of each text.
#
# KL(reference || model) is computed on the (k + 1)-bucket distribution: the reference's top-k tokens, and the rest
# merged into one bucket (the model's tail mass is 1 minus its mass on those k tokens). Merging outcomes can only
# lower a KL divergence (data-processing inequality), so this is a lower bound of the exact KL, equal to it when
# k >= the vocabulary size and exactly 0 when the model's log-probabilities equal the reference's.


def coarse_logprobs(logprobs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[n, k + 1]``: ``logprobs`` (``[n, V]``) at ``index`` (``[n, k]``) and the log of the mass outside it."""
    tail = torch.logsumexp(logprobs.scatter(-1, index, float("-inf")), -1, keepdim=True)
    return torch.cat([logprobs.gather(-1, index), tail], -1)


def coarse_kl(ref: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """``[n]`` KL(ref || model) of log-probability rows ``[n, K]`` (terms where the reference has no mass are 0)."""
    return torch.where(ref > float("-inf"), ref.exp() * (ref - model), 0.0).sum(-1)


class _TopK:
    """A ``loglikelihoods`` token callback keeping, per scored token, the reference's top-``k`` token ids (``index``,
    ``[T, k]``) and the coarse log-probs (``coarse``, ``[T, k + 1]``); ``k`` is capped at the vocabulary size."""

    def __init__(self, num_tokens: Sequence[int], k: int):
        self.offsets = np.concatenate([[0], np.cumsum(num_tokens)]).astype(int)
        self.k = k
        self.index = self.coarse = None

    def __call__(self, i: int, start: int, logprobs: torch.Tensor) -> None:
        if self.index is None:
            k = min(self.k, logprobs.shape[-1])
            self.index = torch.zeros(int(self.offsets[-1]), k, dtype=torch.int32)
            self.coarse = torch.zeros(int(self.offsets[-1]), k + 1)
        index = logprobs.topk(self.index.shape[-1], -1).indices
        rows = slice(self.offsets[i] + start, self.offsets[i] + start + len(logprobs))
        self.index[rows] = index.int().cpu()
        self.coarse[rows] = coarse_logprobs(logprobs, index).cpu()


class _KLToReference:
    """A ``loglikelihoods`` token callback: per scored token, the coarse KL(reference || model) (model pass)."""

    def __init__(self, ref: dict):
        self.ref, self.offsets = ref, np.concatenate([[0], np.cumsum(ref["num_tokens"])]).astype(int)
        self.kl = torch.full((int(self.offsets[-1]),), float("nan"))

    def __call__(self, i: int, start: int, logprobs: torch.Tensor) -> None:
        rows = slice(self.offsets[i] + start, self.offsets[i] + start + len(logprobs))
        index = self.ref["index"][rows].to(logprobs.device).long()
        ref = self.ref["coarse"][rows].to(logprobs.device)
        self.kl[rows] = coarse_kl(ref, coarse_logprobs(logprobs, index)).cpu()

    def per_request(self) -> list[torch.Tensor]:
        """Per request, its tokens' KLs."""
        return [self.kl[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]


HELDOUT = "heldout"  # the name of the held-out text entry of a reference


@dataclass
class ReferenceOutputs:
    """A reference model's per-example outputs (:func:`reference_outputs`).

    tasks: ``{name: entry}``; an entry holds ``records`` (per doc: ``doc_id``, ``gold``, ``chosen``, ``loglik`` per
    choice, ``char_len``...; per held-out text: ``loglik``), ``num_tokens`` (scored tokens per
    request, in request order), ``index`` (``[T, k]`` int32 top-k token ids) and ``coarse`` (``[T, k + 1]`` the
    reference's log-probs of those tokens and of the tail), and ``requests`` (a hash of the encoded requests).
    config: the settings every compared model is run with (shots, limit, seed, batch size, context sharing, lengths).
    """

    tasks: dict[str, dict]
    config: dict


def _requests_hash(requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str:
    return hashlib.sha256(json.dumps([[list(c), list(x)] for c, x in requests]).encode()).hexdigest()[:16]


def _text_requests(tokenizer, texts: Sequence[str], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Each text (its first ``max_length`` tokens, as the evaluation encodes it) as one request: the first token is
    the context, the rest the scored continuation. Texts of fewer than 2 tokens are left out."""
    enc = [tok_encode(tokenizer, t)[:max_length] for t in texts]
    return [(e[:1], e[1:]) for e in enc if len(e) >= 2]


def _task_requests(tokenizer, name: str, config: dict):
    """``(records template, encoded requests)``. Template: None for held-out text; a generative task's doc ids (one
    request per doc: its generation prompt, then the gold answer); a multiple-choice task's (doc ids, docs, per doc
    request strings)."""
    if name == HELDOUT:
        return None, _text_requests(tokenizer, config["texts"], config["text_max_length"])
    task = get_task(name)
    if isinstance(task, GenerativeTask):
        idx, docs, prompts = generative_prompts(task, config["shots"][name], config["limit"], config["seed"])
        return idx, [encode_pair(tokenizer, p, task.target_delimiter + task.doc_to_target(d))
                     for p, d in zip(prompts, docs)]
    idx, docs, per_doc, flat = multiple_choice_requests(tokenizer, task, config["shots"][name], config["limit"],
                                                        config["seed"])
    return (idx, docs, per_doc), flat


def _scores(model, tokenizer, name: str, requests, config: dict, token_fn, stats, batch_size: int):
    held = name == HELDOUT
    return loglikelihoods(model, requests, batch_size=batch_size,
                          max_length=config["text_max_length"] if held else config["max_length"],
                          pad_id=pad_token_id(tokenizer), share_context=False if held else config["share_context"],
                          stats=stats, desc=name, token_fn=token_fn)


def _records(name: str, template, out) -> list[dict]:
    """Per-example records of one pass (``template`` from :func:`_task_requests`): per multiple-choice doc, per
    generative doc (the gold answer's summed log-likelihood) or per held-out text (the summed log-likelihood of its
    tokens after the first)."""
    if template is None:
        return [{"task": HELDOUT, "doc_id": j, "loglik": ll} for j, (ll, _) in enumerate(out)]
    if isinstance(get_task(name), GenerativeTask):
        return [{"task": name, "doc_id": int(i), "loglik": ll} for i, (ll, _) in zip(template, out)]
    idx, docs, per_doc = template
    task, records, pos = get_task(name), [], 0
    for i, d, reqs in zip(idx, docs, per_doc):
        records.append(choice_record(task, i, d, [ll for ll, _ in out[pos : pos + len(reqs)]]))
        pos += len(reqs)
    return records


def reference_outputs(
    model,
    tokenizer,
    tasks: str | Iterable[str] = (),
    texts: Sequence[str] | None = None,
    *,
    num_fewshot: int | dict[str, int] | None = None,
    limit: int | None = None,
    seed: int = 1234,
    batch_size: int = 16,
    share_context: bool = True,
    max_length: int | None = None,
    text_max_length: int = 512,
    topk: int = 64,
    cache: bool = True,
) -> ReferenceOutputs:
    """Run the reference ``model`` (e.g. the dense base) once on ``tasks`` and on held-out ``texts``, and keep per
    example what :func:`fidelity` compares against: the log-likelihoods, the chosen answers and per scored token the
    ``topk`` largest log-probabilities with their token ids and the tail mass. Multiple-choice tasks: the requests
    :func:`evaluate` scores with the same arguments; generative tasks: each evaluated doc's gold answer after the
    prompt :func:`evaluate` generates from (teacher forcing).

    cache: read/write each task's outputs under ``<cache_dir()>/eval/reference/``, keyed like :func:`evaluate`'s
        results (model fingerprint, task, shots, limit, seed, share_context, max_length, harness version) plus
        ``topk`` (and a hash of the texts for held-out text).
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    for name in names:
        get_task(name)  # unknown names raise, listing the tasks
    if topk < 1 or batch_size < 1:
        raise ValueError(f"reference_outputs needs topk >= 1 and batch_size >= 1, got topk={topk}, "
                         f"batch_size={batch_size}")
    if texts is not None and not _text_requests(tokenizer, texts, text_max_length):
        raise ValueError(f"reference_outputs: none of the {len(texts)} texts has 2 tokens; pass longer texts")
    config = {
        "model": model_fingerprint(model), "shots": {n: resolve_shots(get_task(n), num_fewshot) for n in names},
        "limit": limit, "seed": seed, "batch_size": batch_size, "share_context": share_context,
        "max_length": max_length or model_max_length(model, tokenizer), "text_max_length": text_max_length,
        "topk": topk, "texts": list(texts) if texts is not None else None, "harness_version": HARNESS_VERSION,
    }
    out = {}
    for name in names + ([HELDOUT] if texts is not None else []):
        key = {"kind": "reference", "version": HARNESS_VERSION, "model": config["model"], "task": name, "topk": topk}
        if name == HELDOUT:
            key |= {"texts": hashlib.sha256(json.dumps(config["texts"]).encode()).hexdigest(),
                    "max_length": text_max_length}
        else:
            key |= {"shots": config["shots"][name], "limit": limit, "seed": seed, "share_context": share_context,
                    "max_length": config["max_length"]}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = _data.cache_dir() / "eval" / "reference" / f"{name}-{digest}.pt"
        if cache and path.is_file():
            out[name] = torch.load(path, weights_only=True)
            log.info("%s: cached reference outputs %s", name, path)
            continue
        template, requests = _task_requests(tokenizer, name, config)
        collect = _TopK([len(c) for _, c in requests], topk)
        scores = _scores(model, tokenizer, name, requests, config, collect, None, batch_size)
        out[name] = {"records": _records(name, template, scores), "num_tokens": [len(c) for _, c in requests],
                     "index": collect.index, "coarse": collect.coarse, "requests": _requests_hash(requests)}
        if cache:
            buf = io.BytesIO()
            torch.save(out[name], buf)
            write_atomic(path, buf.getvalue())
    return ReferenceOutputs(out, config)


@dataclass
class FidelityResults:
    """Paired fidelity of a model to a reference (:func:`fidelity`).

    tasks: ``{name: {"metrics": {metric: {value, ci_low, ci_high, n, n_boot}}, "records": [per example],
    "routing": the executed fractions of the model's pass (RoutingStats.summary; {} for a dense model)}}``; multiple-choice metrics ``delta_loglik``, ``agreement``, ``kl``; held-out
    text ``ppl_ratio``, ``kl`` (and ``ppl``/``ref_ppl`` without a CI); generative tasks ``delta_loglik``, ``kl``.
    """

    tasks: dict[str, dict]
    config: dict

    def to_dataframe(self):
        """One row per (task, metric): value, 95% CI, n (pandas)."""
        import pandas as pd

        return pd.DataFrame([{"task": name, "metric": m, **v} for name, t in self.tasks.items()
                             for m, v in t["metrics"].items()])

    def records_dataframe(self):
        """One row per example (doc or held-out text) of every task (pandas)."""
        import pandas as pd

        return pd.DataFrame([r for t in self.tasks.values() for r in t["records"]])

    def choice_frame(self):
        """One row per multiple-choice doc (pandas), indexed by (task, doc_id): ``accuracy`` (1 if the model chose
        the gold answer by the task's metric), ``ref_accuracy`` (the reference's), ``kl``, ``delta_loglik`` and
        ``agreement``. Raises ``ValueError`` when the results hold no multiple-choice task."""
        df = self.records_dataframe()
        if "gold" not in df:
            raise ValueError(f"choice_frame: no multiple-choice task among {list(self.tasks)}")
        df = df[df.gold.notna()]  # held-out texts and generative docs have no gold choice
        df = df.assign(accuracy=(df.chosen == df.gold).astype(float),
                       ref_accuracy=(df.ref_chosen == df.gold).astype(float))
        return df.set_index(["task", "doc_id"])[["accuracy", "ref_accuracy", "kl", "delta_loglik", "agreement"]]

    @property
    def routing(self) -> dict:
        """Executed fractions over all tasks' passes (``RoutingStats.summary``; {} for a dense model)."""
        total = RoutingStats()
        for t in self.tasks.values():
            total.merge(RoutingStats(t["routing"].get("counts", {})))
        return total.summary()


def task_average(frame, column: str, n_boot: int = 10000, seed: int = 0) -> dict:
    """:func:`task_average_ci` of ``frame[column]`` grouped by the ``task`` index level (or column) of ``frame``, e.g.
    a :meth:`FidelityResults.choice_frame` or the difference of two (paired by doc): the unweighted mean over tasks
    with a bootstrap CI that resamples each task's docs."""
    tasks = frame.index.get_level_values("task") if "task" in frame.index.names else frame["task"]
    per_task = {t: frame[column].to_numpy()[tasks == t] for t in dict.fromkeys(tasks)}
    return task_average_ci(per_task, n_boot, seed)


def _per_token_mean(resampled: np.ndarray) -> np.ndarray:
    """``sum(column 0) / sum(column 1)`` over the examples of ``[k, n, 2]`` resamples (column 1: tokens)."""
    return resampled[..., 0].sum(1) / resampled[..., 1].sum(1)


def _perplexity_ratio(resampled: np.ndarray) -> np.ndarray:
    """``exp`` of the per-token mean NLL difference (column 0) of ``[k, n, 2]`` resamples."""
    return np.exp(_per_token_mean(resampled))


def _choice_fidelity(name: str, ref: dict, records: list[dict], kls: list[torch.Tensor]) -> list[dict]:
    """Per doc: the change of the gold continuation's log-likelihood (normalised as the task's metric: summed for
    ``acc``, divided by the choice's length in characters for ``acc_norm``), agreement of the chosen answers, and
    the mean over the doc's scored tokens (all its requests) of the coarse KL."""
    norm = get_task(name).metric == "acc_norm"
    out, pos = [], 0
    for r, m in zip(ref["records"], records):
        if r["doc_id"] != m["doc_id"]:
            raise ValueError(f"{name}: doc {m['doc_id']} does not match the reference's doc {r['doc_id']}")
        g, n = r["gold"], len(m["loglik"])
        scale = r["char_len"][g] if norm else 1.0
        kl = torch.cat(kls[pos : pos + n])
        pos += n
        out.append({"task": name, "doc_id": r["doc_id"], "gold": g, "chosen": m["chosen"], "ref_chosen": r["chosen"],
                    "agreement": float(m["chosen"] == r["chosen"]),
                    "delta_loglik": (m["loglik"][g] - r["loglik"][g]) / scale, "kl": float(kl.mean()),
                    "tokens": int(kl.numel()), "loglik": m["loglik"], "ref_loglik": r["loglik"]})
    return out


def _pass_cache_path(fingerprint: dict, ref: ReferenceOutputs, name: str, batch_size: int) -> Path:
    """Where :func:`fidelity` keeps one model's pass over one task of ``ref``: keyed by the model's fingerprint (incl.
    routers and thresholds), the reference's fingerprint and settings, the task's request hash and the batch size."""
    cfg = {k: v for k, v in ref.config.items() if k != "texts"}
    key = {"kind": "fidelity", "version": HARNESS_VERSION, "model": fingerprint, "reference": cfg, "task": name,
           "requests": ref.tasks[name]["requests"], "batch_size": batch_size}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return _data.cache_dir() / "eval" / "fidelity" / f"{name}-{digest}.pt"


def _model_pass(model, tokenizer, name: str, entry: dict, template, requests, config: dict, batch_size: int,
                path: Path | None) -> tuple[list[dict], list[torch.Tensor], dict]:
    """One pass of ``model`` over a reference task's ``requests``: its per-example records, per request the KLs of
    its scored tokens to the reference (``entry``) and the routing summary. Read from / written to ``path`` (None: no
    cache)."""
    if path is not None and path.is_file():
        cached = torch.load(path, weights_only=True)
        log.info("%s: cached fidelity pass %s", name, path)
        return cached["records"], list(torch.split(cached["kl"], cached["lengths"])), cached["routing"]
    stats, kl = RoutingStats(), _KLToReference(entry)
    records = _records(name, template, _scores(model, tokenizer, name, requests, config, kl, stats, batch_size))
    kls, routing = kl.per_request(), stats.summary()
    if path is not None:
        buf = io.BytesIO()
        torch.save({"records": records, "kl": torch.cat(kls), "lengths": [len(k) for k in kls], "routing": routing},
                   buf)
        write_atomic(path, buf.getvalue())
    return records, kls, routing


def fidelity(model, tokenizer, ref: ReferenceOutputs, *, batch_size: int | None = None, n_boot: int = 1000,
             seed: int = 0, cache: bool = True) -> FidelityResults:
    """Paired fidelity of ``model`` (e.g. a routed or dropped copy) to the reference ``ref`` on the same requests:
    one pass of ``model``. Each metric comes with a paired bootstrap 95% CI over examples (``n_boot`` replicates,
    ``seed``); per-example values are in ``records``.

    Multiple-choice tasks, per doc: ``delta_loglik`` = model - reference log-likelihood of the gold continuation
    (normalised as the task's metric), ``agreement`` = 1 if the model chose the reference's answer, ``kl`` = the
    coarse KL(reference || model) averaged over the doc's scored tokens (then over docs; a lower bound of the exact
    KL, see the section comment). Generative tasks, per doc (teacher-forced on the gold answer): ``delta_loglik`` =
    model - reference summed log-likelihood of the answer, ``kl`` = the coarse KL averaged over its tokens. Held-out
    text, per text: ``ppl_ratio`` = exp(mean token NLL difference) =
    model / reference perplexity, ``kl`` = the coarse KL averaged over all tokens (token-weighted, as the ratio).

    cache: read/write each task's pass under ``<cache_dir()>/eval/fidelity/``, keyed by the model's fingerprint
        (:func:`model_fingerprint`: weights, routers, thresholds, static drop, routing mode), the reference and the
        batch size, so a setting scored by several studies runs once; the bootstrap is recomputed.
    """
    if n_boot < 1000:
        raise ValueError(f"fidelity needs n_boot >= 1000 bootstrap replicates for a 95% CI, got {n_boot}")
    batch_size = batch_size or ref.config["batch_size"]
    fingerprint = model_fingerprint(model)
    results = {}
    for name, entry in ref.tasks.items():
        template, requests = _task_requests(tokenizer, name, ref.config)
        if _requests_hash(requests) != entry["requests"]:
            raise ValueError(f"{name}: the requests differ from the reference's (another tokenizer or data?); "
                             "compare models that share the reference's tokenizer")
        path = _pass_cache_path(fingerprint, ref, name, batch_size) if cache else None
        records, kls, routing = _model_pass(model, tokenizer, name, entry, template, requests, ref.config, batch_size,
                                            path)
        if name == HELDOUT:
            rows = [{"task": name, "doc_id": m["doc_id"], "tokens": len(k), "nll": -m["loglik"],
                     "ref_nll": -r["loglik"], "kl": float(k.mean())} for r, m, k in zip(entry["records"], records, kls)]
            tok = np.array([r["tokens"] for r in rows], dtype=float)
            x_ppl = np.stack([[r["nll"] - r["ref_nll"] for r in rows], tok], -1)
            x_kl = np.stack([[float(k.sum()) for k in kls], tok], -1)
            metrics = {"ppl_ratio": bootstrap_ci(x_ppl, n_boot, seed, _perplexity_ratio),
                       "kl": bootstrap_ci(x_kl, n_boot, seed, _per_token_mean)}
            for m, col in (("ppl", "nll"), ("ref_ppl", "ref_nll")):
                metrics[m] = {"value": math.exp(sum(r[col] for r in rows) / tok.sum()), "n": len(rows)}
        elif isinstance(get_task(name), GenerativeTask):
            rows = [{"task": name, "doc_id": m["doc_id"], "tokens": len(k), "delta_loglik": m["loglik"] - r["loglik"],
                     "kl": float(k.mean())} for r, m, k in zip(entry["records"], records, kls)]
            metrics = {m: bootstrap_ci([r[m] for r in rows], n_boot, seed) for m in ("delta_loglik", "kl")}
        else:
            rows = _choice_fidelity(name, entry, records, kls)
            metrics = {m: bootstrap_ci([r[m] for r in rows], n_boot, seed) for m in ("delta_loglik", "agreement", "kl")}
        results[name] = {"metrics": metrics, "records": rows, "routing": routing}
    config = {"model": fingerprint, "reference": ref.config["model"], "batch_size": batch_size,
              "n_boot": n_boot, "seed": seed}
    return FidelityResults(results, config)
