"""The evaluator: :func:`evaluate` runs tasks on a model, caches each task's result by the model's identity
(:func:`model_fingerprint`, incl. routers and thresholds) and settings, and scores multiple-choice tasks.

Metrics: ``acc`` = argmax of summed log-likelihoods; ``acc_norm`` = argmax of log-likelihood / ``len(choice)``
in characters (what lm-eval 0.4.13 computes; the byte lengths are recorded too and equal it for ASCII text).
MMLU is lm-eval's ``mmlu`` group: size-weighted mean of the subjects = accuracy over all questions (micro).
Routing semantics of ``share_context``: see :mod:`.scoring`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import data as _data
from ..reporting import write_json
from .generation import run_generative
from .requests import build_requests, encode_pair, fewshot_sampler, model_max_length, pad_token_id
from .results import EvalResults, TaskResult, mean_stderr
from .scoring import RoutingStats, loglikelihoods
from .tasks import PAPER_TASKS, GenerativeTask, get_task, task_docs

log = logging.getLogger(__name__)

HARNESS_VERSION = "2"  # bump when prompts/scoring change, to invalidate cached results


def model_fingerprint(model) -> dict:
    """Identity of a model for the results cache: name, class, dtype, parameter count, a hash of weight samples,
    and (if routed) a hash of router weights + thresholds + router config + routing mode."""
    h = hashlib.sha256()
    n = 0
    for name, p in model.named_parameters():
        if ".router." in name:
            continue
        n += p.numel()
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    ident = {
        "name_or_path": str(getattr(model.config, "name_or_path", "")),
        "class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype),
        "params": n,
        "weights": h.hexdigest()[:16],
        "routers": router_hash(model),
    }
    return ident


def router_hash(model) -> str | None:
    setup = getattr(model, "routertune", None)
    if setup is None:
        return None
    from ..routing import routed_layers

    h = hashlib.sha256(json.dumps({"config": asdict(setup.config), "static": setup.static, "mode": setup.mode},
                                  sort_keys=True).encode())
    for i, layer in sorted(routed_layers(model).items()):
        h.update(f"{i}:{layer.routing.threshold}".encode())
        dropped = getattr(layer.routing, "dropped_experts", None)  # static expert drop (moe.attach_expert_drop)
        if dropped:
            h.update(f"dropped:{list(dropped)}".encode())
        if layer.router is not None:  # weight, then the bias where the router has one
            for p in layer.router.parameters():
                h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return _data.cache_dir() / "eval" / f"{key['task']}-{digest}.json"


def resolve_shots(task, num_fewshot) -> int:
    """``task``'s few-shot count under :func:`evaluate`'s ``num_fewshot`` (None or a task missing from a dict: the
    task's paper shots). Raises ``ValueError`` for anything but an integer >= 0."""
    shots = num_fewshot.get(task.name) if isinstance(num_fewshot, dict) else num_fewshot
    if shots is None:
        return task.num_fewshot
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 0:
        raise ValueError(f"num_fewshot={shots!r} for task {task.name!r}: pass an integer >= 0 (0 = zero-shot), or "
                         f"None for the paper's shots ({task.num_fewshot})")
    return int(shots)


def evaluate(
    model,
    tokenizer,
    tasks: str | Iterable[str] = PAPER_TASKS,
    num_fewshot: int | dict[str, int] | None = None,
    limit: int | None = None,
    seed: int = 1234,
    batch_size: int = 16,
    cache: bool = True,
    share_context: bool = True,
    max_length: int | None = None,
) -> EvalResults:
    """Evaluate ``model`` on ``tasks`` (names of :data:`TASK_REGISTRY`; default the paper's eight).

    num_fewshot: None = paper Table 1 shots per task (BoolQ 0, RTE 0, OBQA 0, PIQA 0, MMLU 5, WinoGrande 5,
        HellaSwag 10, ARC-C 25; ARC-Easy 0; generative 5); an int for all tasks (0 = the fast CPU setting); or a dict.
    limit: evaluate a fixed seeded subset of each eval split (see :func:`subset_indices`).
    seed: subset seed and lm-eval's few-shot sampler seed (lm-eval's default is 1234).
    batch_size: rows per forward; share_context: see the module docstring (routing semantics).
    cache: read/write per-task results under ``<cache_dir()>/eval/``, keyed by model fingerprint (incl. routers),
        task, shots, limit, seed, share_context, max_length and harness version.
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    shots_of = {n: resolve_shots(get_task(n), num_fewshot) for n in names}  # bad tasks and shots fail before any work
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: pass an integer >= 1 (rows per forward; smaller uses less memory)")
    max_length = max_length or model_max_length(model, tokenizer)
    ident = model_fingerprint(model) if cache else None
    results: dict[str, TaskResult] = {}
    total = RoutingStats()
    for name in names:
        task = get_task(name)
        shots = shots_of[name]
        key = {
            "version": HARNESS_VERSION, "model": ident, "task": name, "shots": shots, "limit": limit, "seed": seed,
            "share_context": share_context, "max_length": max_length,
        }
        if isinstance(task, GenerativeTask):
            key["task_version"] = task.version
        path = _cache_path(key) if cache else None
        if path is not None and path.is_file():
            r = TaskResult(**json.loads(path.read_text()))
            r.cached = True
            log.info("%s: cached result %s", name, path)
        else:
            start = time.perf_counter()
            if isinstance(task, GenerativeTask):
                r = run_generative(model, tokenizer, task, shots, limit, seed, batch_size, max_length)
            else:
                r = _run_multiple_choice(model, tokenizer, task, shots, limit, seed, batch_size, max_length,
                                         share_context)
            r.seconds = time.perf_counter() - start
            if path is not None:
                write_json(path, asdict(r), indent=None)
        log.info("%s (%d-shot, n=%d): %s = %.4f", name, r.num_fewshot, r.n, r.metric, r.score)
        total.merge(RoutingStats(r.routing))
        results[name] = r
    config = {
        "model": ident or model_fingerprint(model), "tasks": names, "num_fewshot": num_fewshot, "limit": limit,
        "seed": seed, "batch_size": batch_size, "share_context": share_context, "max_length": max_length,
        "harness_version": HARNESS_VERSION,
    }
    return EvalResults(results, config, total.summary())


def multiple_choice_requests(tokenizer, task, shots: int, limit: int | None, seed: int):
    """The evaluated docs of ``task`` and their requests: ``(doc ids, docs, per doc [(context, continuation)] strings,
    all requests encoded [(context_enc, continuation_enc)] in doc order)``."""
    idx, docs = task_docs(task.name, limit, seed)
    per_doc = build_requests(task, docs, shots, fewshot_sampler(task, shots, seed))
    flat = [encode_pair(tokenizer, c, x) for reqs in per_doc for c, x in reqs]
    return idx, docs, per_doc, flat


def choice_record(task, doc_id: int, doc: dict, lls: Sequence[float]) -> dict:
    """One doc's record from its choices' log-likelihoods ``lls``: the predictions of ``acc`` and ``acc_norm``, the
    task metric's choice (``chosen``), both scores and the choices' lengths."""
    choices = task.doc_to_choice(doc)
    chars = [float(len(c)) for c in choices]
    nbytes = [float(len(c.encode("utf-8"))) for c in choices]
    gold = task.gold(doc)
    pred = int(np.argmax(lls))
    pred_norm = int(np.argmax(np.asarray(lls) / np.asarray(chars)))
    rec = {
        "task": task.name, "doc_id": int(doc_id), "gold": gold, "pred": pred, "pred_norm": pred_norm,
        "chosen": pred_norm if task.metric == "acc_norm" else pred, "loglik": list(lls), "char_len": chars,
        "byte_len": nbytes, "acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
        "num_choices": len(choices),
    }
    if task.fewshot_group:
        rec["subject"] = task.fewshot_group(doc)
    return rec


def _run_multiple_choice(model, tokenizer, task, shots, limit, seed, batch_size, max_length, share_context):
    idx, docs, per_doc, flat = multiple_choice_requests(tokenizer, task, shots, limit, seed)
    stats = RoutingStats()
    out = loglikelihoods(model, flat, batch_size=batch_size, max_length=max_length, pad_id=pad_token_id(tokenizer),
                         share_context=share_context, stats=stats, desc=task.name)
    records, pos = [], 0
    for i, d, reqs in zip(idx, docs, per_doc):
        records.append(choice_record(task, i, d, [ll for ll, _ in out[pos : pos + len(reqs)]]))
        pos += len(reqs)
    metrics, stderr = {}, {}
    for m in ("acc", "acc_norm"):
        metrics[m], stderr[m] = mean_stderr([r[m] for r in records])
    subtasks = {}
    if task.fewshot_group:
        by = defaultdict(list)
        for r in records:
            by[r["subject"]].append(r["acc"])
        subtasks = {s: {"acc": float(np.mean(v)), "n": len(v)} for s, v in sorted(by.items())}
    return TaskResult(
        task.name, task.metric, shots, len(records), metrics, stderr,
        chance=float(np.mean([1.0 / r["num_choices"] for r in records])), records=records,
        routing={k: list(v) for k, v in stats.counts.items()}, subtasks=subtasks,
    )

