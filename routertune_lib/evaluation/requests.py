"""Few-shot sampling, request strings and their tokenization, as lm-eval 0.4.13 builds them.

* few-shot: ``description + sum(q_i + " " + a_i + "\\n\\n") + q``; examples are drawn by one ``random.Random(seed)``
  per task, consumed doc after doc in evaluation order (``rnd.sample(pool, n)``; when the few-shot split is the
  evaluated split -- the RTE fallback -- ``n + 1`` are drawn and the evaluated doc removed); MMLU takes the first
  ``n`` dev examples of the doc's subject (lm-eval's ``first_n`` sampler).
* requests: ``(context, " " + choice)`` per choice; WinoGrande (``multiple_input``) is partial scoring, one context
  per option (the sentence up to the blank, filled in) and the shared continuation (the rest of the sentence).
* tokenization: lm-eval's ``_encode_pair``: trailing spaces of the context move into the continuation;
  ``whole = encode(context + continuation)``, ``context_enc = encode(context)``,
  ``continuation_enc = whole[len(context_enc):]``; the tokenizer's own special-token default (HFLM's
  ``add_bos_token=None``: SmolLM2 adds no BOS, Gemma adds one); an empty context becomes ``[bos or eos]``;
  sequences longer than ``max_length + 1`` lose tokens on the left (:func:`scoring.loglikelihoods`).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence

from .. import data as _data
from .tasks import GenerativeTask, MultipleChoiceTask, get_task

log = logging.getLogger(__name__)

def task_prompts(tasks: str | Iterable[str], num_prompts: int, seed: int = 0, num_fewshot: int = 0) -> list[str]:
    """``num_prompts`` 0-shot contexts (the strings :func:`evaluate` scores choices after, or a generative task's
    prompt), drawn seeded and round robin over ``tasks`` from each task's few-shot split (its training split where
    the data has one; a generative task's evaluated split when its few-shot pool is that split).

    This is unlabelled calibration text in the evaluation's format: thresholds calibrated on it give the target
    capacity on the evaluation, where chat conversations (the tuning data) route differently. Multiple-input tasks
    (WinoGrande) contribute their gold context. Tasks whose few-shot split is their eval split (RTE offline) warn.
    num_fewshot: prepend this many solved examples of the same pool (never the prompt's own doc), as
        :func:`evaluate` does with ``num_fewshot``: a sequence-level router decides on the mean over the whole prompt,
        so calibrate few-shot evaluations on few-shot prompts. 0 gives the 0-shot contexts (the same ones as before).
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if num_prompts < 1 or not names:
        raise ValueError(f"task_prompts needs num_prompts >= 1 and at least one task, got {num_prompts}, {names}")
    if num_fewshot < 0:
        raise ValueError(f"task_prompts needs num_fewshot >= 0, got {num_fewshot}")
    pools = []
    for name in names:
        task = get_task(name)
        if isinstance(task, GenerativeTask):
            docs = task.load("eval" if task.fewshot_from_eval else "fewshot")
        else:
            docs = _data.load_task(name, "fewshot").to_list()
            docs = [task.process_doc(d) for d in docs] if task.process_doc else docs
        order = list(range(len(docs)))
        random.Random(f"{name}:prompts:{seed}").shuffle(order)  # the same permutation for any num_fewshot
        sampler = FewshotSampler(task, docs, seed, exclude_eval_doc=True) if num_fewshot else None
        texts = []
        for i in order[:num_prompts]:
            shots = sampler.sample(num_fewshot, docs[i]) if sampler else ()
            if isinstance(task, GenerativeTask):
                texts.append(task.prompt(docs[i], shots))
            else:
                texts.append(task.requests(docs[i], shots)[task.gold(docs[i]) if task.multiple_input else 0][0])
        pools.append(texts)
    out = []
    for rank in range(max(map(len, pools))):
        out += [p[rank] for p in pools if rank < len(p)]
    out = out[:num_prompts]
    if len(out) < num_prompts:
        log.info("task_prompts: only %d of %d prompts available", len(out), num_prompts)
    return out


def held_out_split(prompts: list[str], num_calibration: int) -> tuple[list[str], list[str]]:
    """``(calibration, held_out)``: the first ``num_calibration`` prompts, and the rest without any text the first
    part has (tasks repeat contexts: HellaSwag's training split holds one context under several docs)."""
    calibration = prompts[:num_calibration]
    seen = set(calibration)
    held_out = [t for t in prompts[num_calibration:] if t not in seen]
    if len(held_out) < len(prompts) - num_calibration:
        log.info("held_out_split: %d held-out prompts repeat a calibration prompt and are dropped",
                 len(prompts) - num_calibration - len(held_out))
    return calibration, held_out


class FewshotSampler:
    """lm-eval 0.4.13's few-shot selection for one task: one ``random.Random(seed)`` consumed doc after doc."""

    def __init__(self, task, pool: list[dict], seed: int, exclude_eval_doc: bool):
        self.task, self.pool, self.exclude = task, pool, exclude_eval_doc
        self.rnd = random.Random(seed)
        self.groups: dict[str, list[dict]] = defaultdict(list)
        if task.fewshot_group:
            for d in pool:
                self.groups[task.fewshot_group(d)].append(d)

    def sample(self, n: int, doc: dict) -> list[dict]:
        if n == 0:
            return []
        group = self.task.fewshot_group(doc) if self.groups else None
        pool = self.groups[group] if self.groups else self.pool
        first_n = self.task.fewshot_sampler == "first_n"
        if first_n and self.exclude:
            pool = [x for x in pool if x != doc]
        drawn = n + 1 if self.exclude and not first_n else n  # lm-eval draws one more and drops the evaluated doc
        if drawn > len(pool):
            where = f" of {group!r}" if group is not None else ""
            raise ValueError(f"{self.task.name}: num_fewshot={n} needs {drawn} examples, its few-shot pool{where} "
                             f"has {len(pool)}: pass num_fewshot <= {len(pool) - (drawn - n)} for this task")
        if first_n:
            return pool[:n]
        if not self.exclude:
            return self.rnd.sample(pool, n)
        res = [x for x in self.rnd.sample(pool, n + 1) if x != doc][:n]
        if len(res) < n:
            res = self.rnd.sample([x for x in pool if x != doc], n)
        return res


def fewshot_sampler(task, shots: int, seed: int) -> FewshotSampler | None:
    if shots == 0:
        return None
    if isinstance(task, GenerativeTask):
        return FewshotSampler(task, task.load("eval" if task.fewshot_from_eval else "fewshot"), seed,
                              task.fewshot_from_eval)
    pool = _data.load_task(task.name, "fewshot").to_list()
    if task.process_doc:
        pool = [task.process_doc(d) for d in pool]
    return FewshotSampler(task, pool, seed, exclude_eval_doc=task.fewshot_excludes_doc)



# -- tokenization (lm-eval HFLM) -----------------------------------------------------------------------------------


def _prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_token_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return t
    return 0


def tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """HFLM.tok_encode with ``add_bos_token=None``: the tokenizer's default, no specials if text starts with BOS."""
    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None:
        prefix = _prefix_token_id(tokenizer)
        if prefix is not None and text.startswith(tokenizer.decode(prefix)):
            kw["add_special_tokens"] = False
    return tokenizer.encode(text, **kw)




def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's request encoding: ``(context_enc, continuation_enc)`` token ids."""
    if context == "":
        cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def model_max_length(model, tokenizer) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    tml = getattr(tokenizer, "model_max_length", None)
    return int(tml) if tml and tml < 1e9 else 2048



def build_requests(task: MultipleChoiceTask, docs: Sequence[dict], shots: int, sampler) -> list[list[tuple[str, str]]]:
    """Per doc, the ``(context, continuation)`` strings of its choices (few-shot sampled in doc order)."""
    return [task.requests(d, sampler.sample(shots, d) if sampler else ()) for d in docs]

