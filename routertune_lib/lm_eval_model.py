"""Routed models inside LM-Evaluation-Harness 0.4.13: the ``routertune`` model type, and our tasks as local lm-eval
tasks (the hub, where lm-eval's task configs read their data, is unreachable offline).

Importing this module registers ``routertune`` with lm-eval's own registry (``register_model``). lm-eval 0.4.13
discovers models only through its built-in table and that registry (no entry-point discovery), so the installed
console script ``routertune-lm-eval`` imports this module and then runs lm-eval's command line unchanged::

    routertune-lm-eval export-tasks --tasks arc_easy,piqa --limit 20 --out rt_tasks   # prints the task names
    routertune-lm-eval --model routertune --include_path rt_tasks --tasks rtlocal_arc_easy \\
        --model_args pretrained=smollm2-135m,routers=r.safetensors,mode=real,threshold=0.5 --batch_size 16

From Python: ``import routertune_lib.lm_eval_model`` then ``lm_eval.simple_evaluate(model="routertune",
model_args={...}, ...)``, or pass a :class:`RouterTuneLM` instance.

model_args: ``pretrained`` (a :func:`routertune_lib.models.load_model` name: built-in name, hub id or local
directory), ``routers`` (a ``save_routers`` checkpoint, attached with ``load_routers``; none: the dense model),
``mode`` (``real`` | ``masked``), ``threshold`` (one decision threshold for every routed layer; default: the
checkpoint's), ``dtype``, ``share_context`` (default true). Other HFLM arguments (``max_length``, ...) pass through.

Routing semantics: :class:`RouterTuneLM` is lm-eval's ``HFLM`` (tokenization, ``_encode_pair``, truncation, rolling
windows, ``generate_until``) whose ``_loglikelihood_tokens`` scores the requests with our engine,
:func:`routertune_lib.evaluation.loglikelihoods`. HFLM itself would run each ``context + continuation[:-1]`` as one
row, so a sequence-level router would decide on the continuation as well; here the context runs first (prefill, where
a sequence-level router decides on the context alone) and every continuation runs on that context's KV cache, reusing
the decision -- exactly our harness (``share_context=True``), so both give the same log-likelihoods for the same
requests. ``share_context=false`` gives HFLM's semantics. Generation (``generate_until``) is HFLM's: the prompt is
the prefill, decode steps reuse sequence-level decisions.

Routing statistics: executed/total decisions of every scoring forward and generation are summed
(:class:`routertune_lib.evaluation.RoutingStats`) and reported in lm-eval's results under
``results["config"]["routertune"]["routing"]`` (``get_model_info``): the executed fraction per routed layer and
overall.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import data
from .evaluation import RoutingStats, loglikelihoods, subset_indices
from .models import load_model
from .reporting import write_atomic
from .routing import load_routers, set_routing_mode, set_thresholds

log = logging.getLogger(__name__)

LOCAL_PREFIX = "rtlocal_"


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"share_context must be true or false, got {value!r}")


@register_model("routertune")
class RouterTuneLM(HFLM):
    """lm-eval's ``HFLM`` around a ``load_model`` model with routers; see the module docstring."""

    def __init__(self, pretrained: str = "smollm2-135m", routers: str | None = None, mode: str = "real",
                 threshold: float | str | None = None, dtype: str | None = None, device: str | None = None,
                 share_context: bool | str = True, batch_size: int | str = 16, **kwargs):
        if routers is None and threshold is not None:
            raise ValueError(f"threshold={threshold!r} needs routers=<checkpoint>.safetensors")
        if isinstance(pretrained, str):
            model, tokenizer = load_model(pretrained, device=device, dtype=dtype)
        else:
            raise TypeError(f"pretrained must be a load_model name (built-in, hub id or directory), got "
                            f"{type(pretrained).__name__}; to evaluate a model object use lm-eval's HFLM")
        if routers is not None:
            if not Path(routers).is_file():
                raise FileNotFoundError(f"routers={routers!r}: no such router checkpoint (save_routers output)")
            load_routers(model, routers)
            set_routing_mode(model, mode)
            if threshold is not None:
                set_thresholds(model, float(threshold))
        if str(batch_size).startswith("auto"):
            raise ValueError(f"batch_size={batch_size!r}: routertune sizes its forwards from an integer batch_size "
                             "(rows x longest sequence); pass e.g. --batch_size 16")
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)
        self.pretrained = pretrained  # HFLM records the hub id for get_model_info
        self.routertune_args = {"pretrained": pretrained, "routers": None if routers is None else str(routers),
                                "mode": mode if routers is not None else None,
                                "threshold": None if threshold is None else float(threshold),
                                "share_context": _as_bool(share_context)}
        self.routing_stats = RoutingStats()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """``(sum log p, is_greedy)`` per ``((context, continuation) | None, context_enc, continuation_enc)``, scored by
        :func:`routertune_lib.evaluation.loglikelihoods` (context prefill, continuations on its cache)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        scores = loglikelihoods(self.model, [(ctx, cont) for _, ctx, cont in requests],
                                batch_size=override_bs or self.batch_size_per_gpu, max_length=self.max_length,
                                pad_id=pad, share_context=self.routertune_args["share_context"],
                                stats=self.routing_stats, desc="routertune loglikelihood")
        for (request, _, _), answer in zip(requests, scores):
            if request is not None:  # rolling windows are cached per document by loglikelihood_rolling
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return scores

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """HFLM's generation, counting routing decisions: all of the prefill, then fresh token-level ones."""
        forwards = [0]

        def count(module, args, output):
            self.routing_stats.add(output, token_level_only=forwards[0] > 0)
            forwards[0] += 1

        handle = self.model.register_forward_hook(count)
        try:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        finally:
            handle.remove()

    def get_model_info(self) -> dict:
        """HFLM's model info plus ``routertune``: the model_args and the routing statistics of this run."""
        routing = self.routing_stats.summary()
        if routing:
            log.info("routertune: executed fraction %.4f over routed layers", routing["overall"])
        return {**super().get_model_info(), "routertune": {**self.routertune_args, "routing": routing}}


# ----------------------------------------------------------------------------------------------------------------
# Our tasks' local data as lm-eval tasks


def lm_eval_task_dir() -> Path:
    """lm-eval's bundled task configs."""
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


_LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "piqa": "piqa/piqa.yaml", "rte": "glue/rte/default.yaml",
    "winogrande": "winogrande/default.yaml",
}


def lm_eval_yaml(name: str) -> Path:
    """lm-eval's task YAML for one of our multiple-choice tasks (``mmlu_<subject>`` for an MMLU subject)."""
    if name.startswith("mmlu_"):
        return lm_eval_task_dir() / "mmlu" / "default" / f"{name}.yaml"
    if name not in _LM_EVAL_YAML:
        raise ValueError(f"No lm-eval task config for {name!r}; known: {sorted(_LM_EVAL_YAML)} and mmlu")
    return lm_eval_task_dir() / _LM_EVAL_YAML[name]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def export_task(name: str, limit: int | None, seed: int, shots: int, out: Path) -> list[tuple[str, list[int]]]:
    """Write our task ``name`` (its evaluated subset: ``evaluate``'s seeded ``limit`` docs, and its few-shot pool when
    ``shots``) to ``out`` as JSONL plus an lm-eval task YAML that ``include``s lm-eval's own config and only points it
    at the local files (``dataset_path: json``, ``dataset_kwargs.data_files``). MMLU gives one task per sampled
    subject (lm-eval's ``mmlu_<subject>``). Returns ``[(lm-eval task name, our doc ids in file order)]``; load with
    ``TaskManager(include_path=out)`` or ``lm_eval --include_path out``."""
    info = data.TASKS[name]
    ds = data.load_task(name)
    idx = subset_indices(len(ds), limit, seed, name)
    rows = ds.select(idx).to_list()
    few = data.load_task(name, "fewshot").to_list() if shots else None
    if name == "mmlu":
        by, ids, fby = defaultdict(list), defaultdict(list), defaultdict(list)
        for i, r in zip(idx, rows):
            by[r["subject"]].append(r)
            ids[r["subject"]].append(i)
        for r in few or []:
            fby[r["subject"]].append(r)
        parts = [(f"mmlu_{s}", by[s], ids[s], fby.get(s)) for s in sorted(by)]
    else:
        parts = [(name, rows, idx, few)]
    made = []
    for lm_name, prows, pidx, pfew in parts:
        ours = f"{LOCAL_PREFIX}{lm_name}"
        eval_file = out / f"{ours}.jsonl"
        _write_jsonl(eval_file, prows)
        lines = [f"include: {lm_eval_yaml(lm_name)}", f"task: {ours}", "tag: []", "dataset_path: json",
                 "dataset_name: null"]
        split_files = {info.eval_split: str(eval_file)}
        if pfew is not None:
            fpath = out / f"{ours}.fewshot.jsonl"
            _write_jsonl(fpath, pfew)
            fs_split = "dev" if name == "mmlu" else info.fewshot_split
            if fs_split == info.eval_split:  # the RTE fallback: lm-eval's config samples from "train"
                fs_split = "train"
            split_files[fs_split] = str(fpath)
        lines.append("dataset_kwargs:\n  data_files:\n" + "".join(f"    {k}: {v}\n" for k, v in split_files.items()))
        for key, split in (("training_split", "train"), ("validation_split", "validation"), ("test_split", "test")):
            lines.append(f"{key}: {split if split in split_files else 'null'}")
        if name == "mmlu":
            lines.append(f"fewshot_split: {'dev' if pfew is not None else 'null'}")
        write_atomic(out / f"{ours}.yaml", "\n".join(lines) + "\n")
        made.append((ours, pidx))
    return made


def _export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routertune-lm-eval export-tasks",
                                description="Write our tasks' local data as lm-eval tasks (for --include_path).")
    p.add_argument("--tasks", required=True, help="comma-separated routertune task names, e.g. arc_easy,piqa,mmlu")
    p.add_argument("--out", type=Path, required=True, help="folder for the YAML and JSONL files")
    p.add_argument("--limit", type=int, default=None, help="docs per task (evaluate's seeded subset); default all")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-fewshot", type=int, default=0, help="> 0 also writes the few-shot pool")
    args = p.parse_args(argv)
    names = []
    for name in args.tasks.split(","):
        if name not in data.TASKS:
            p.error(f"unknown task {name!r}; known: {','.join(sorted(data.TASKS))}")
        names += [n for n, _ in export_task(name, args.limit, args.seed, args.num_fewshot, args.out)]
    print(f"--include_path {args.out} --tasks {','.join(names)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``routertune-lm-eval``: ``export-tasks ...`` (see :func:`export_task`), else lm-eval's own command line with
    the ``routertune`` model registered."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export-tasks"]:
        return _export_main(argv[1:])
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["routertune-lm-eval", *argv]
    cli_evaluate()
    return 0


__all__ = ["LOCAL_PREFIX", "RouterTuneLM", "export_task", "lm_eval_task_dir", "lm_eval_yaml", "main"]


if __name__ == "__main__":
    sys.exit(main())

