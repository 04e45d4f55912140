"""``python -m routertune_lib.reproduce --profile paper --check``: every notebook's ``paper`` code path on a CPU, with
the paper's models shrunk, and the GPU time and memory the real run needs.

How: each notebook runs with papermill in the ``paper`` profile, with one cell added after its parameters that calls
:func:`install` in the kernel. :func:`install` changes only sizes, never settings:

* models: ``load_model`` of a paper hub id (:data:`routertune_lib.model_configs.PAPER_CONFIGS`) writes
  :func:`~routertune_lib.model_configs.save_shrunk` (real architecture class, attention type, vocabulary, RoPE,
  sliding window, MoE routing and depth -- notebooks route ``N // 2`` or the paper's layer counts --; width 64, 8
  experts; the stand-in tokenizer) and loads that directory through the real
  ``load_model`` in bfloat16, the dtype ``load_model`` picks on a bf16 GPU (device placement: ``load_model``'s own);
* evaluation: ``evaluate`` and ``reference_outputs`` (then each ``fidelity`` pass) run the paper's tasks and shots on
  :data:`CHECK_DOCS` docs per task, and ``reference_outputs`` / ``dynamics.document_kl`` on :data:`CHECK_DOCS`
  held-out texts (at the paper's lengths);
* router tuning: ``train_routers`` runs one optimizer step of one micro batch (the paper's ``micro_batch``,
  ``max_length``, learning rate, bf16 autocast); ``training_cost.measure_method`` runs in the kernel with one step;
* timing: ``compare_settings`` times one batch of the paper's batch size and prompt length, 4 new tokens, once;
* unlabelled prompts: LLM-Drop importance runs one batch; threshold calibration, executed fractions, the MoE expert
  statistics (Expert Drop importance, expert load) and the MoE real-vs-masked comparison :data:`CHECK_DOCS` prompts
  (not estimated: small next to evaluation); the decision pull and skip effect of the training loss
  (:mod:`routertune_lib.dynamics`, notebook 12) one batch of conversations (the paper's micro batch);
* tasks only the hub serves (GSM8K, notebook 03): when the hub is unreachable, GSM8K-shaped stand-in documents
  (:func:`offline_stand_ins`: the data wheel's arithmetic questions, ``#### <answer>`` targets, as many as GSM8K's
  splits hold), in the kernel and in the estimate; the report names them.

Each patched call appends the paper-size workload it was asked for to a JSON-lines record; :func:`estimate` turns it
into GPU time and memory on one A100 80GB (:data:`GPU`) from the real models' parameter counts:

* FLOPs: forward ``2 * N * tokens`` (N: parameters active per token, without the input embedding; the LM head only
  where logits are kept); router tuning and LoRA ``4 * N * tokens`` (forward, backward through activations, no weight
  gradients), full fine-tuning ``6 * N * tokens``; at ``GPU["mfu"]`` of the bf16 peak.
* decode steps (generation, timing) are memory bound: ``weights bytes / HBM bandwidth`` per step.
* tokens: evaluation = docs (the full eval split) x the mean tokens of 32 of the task's 0-shot prompts (stand-in
  tokenizer) x (1 + shots) + generated tokens, + held-out texts x their maximum length (an upper bound); tuning =
  conversations x epochs x mean conversation tokens (chat template, capped at ``max_length``).
* memory: bf16 weights (2 bytes/parameter) + the largest of: the KV cache of a timing batch (batch x (prompt + new
  tokens) x KV bytes/token), router-tuning activations (micro batch x longest conversation x layers x
  (``ACT_BYTES_PER_HIDDEN`` x hidden) + 6 bytes x vocabulary per token for logits and log-softmax; an upper bound:
  all layers keep activations), and for full fine-tuning bf16 gradients + fp32 AdamW moments (+12 bytes/parameter).
  Routing skips half of some layers' work: these are the dense model's costs, an upper bound.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import importlib
import itertools
import json
import logging
import math
import os
import pkgutil
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("routertune.paper_check")

CHECK_DOCS = 4  # evaluated docs per task
CHECK_WIDTH = 64  # hidden size of the shrunk models (their depth is the real one)
CHECK_NEW_TOKENS = 4  # generated tokens per timing run
GPU = dict(name="A100 80GB", peak_flops=312e12, mfu=0.4, hbm_bytes_per_s=2.0e12, memory_bytes=80e9)
ACT_BYTES_PER_HIDDEN = 34  # bytes per token per layer per hidden unit kept for backward (Korthikanti et al. 2022)
PROMPT_SAMPLE = 32
KEEP_FREED_BYTES = 1 << 34  # glibc thresholds in the kernels (check_notebooks)
WORKLOADS = ("eval", "tune", "cost", "speed")  # record kinds the estimate counts
GSM8K_SPLITS = {"eval": 1319, "fewshot": 7473}  # rows of openai/gsm8k "main": test, train


# ----------------------------------------------------------------------------------------------------------------
# Tasks only the hub serves


def _gsm8k_stand_in(split: str) -> list[dict]:
    """``GSM8K_SPLITS[split]`` GSM8K-shaped docs (``question``, ``answer`` ending in ``#### <answer>``) cycled from
    the data wheel's arithmetic questions."""
    from .evaluation import get_task

    rows = get_task("arithmetic").load(split)
    return [{"question": r["question"], "answer": f"{r['answer']}\n#### {r['answer']}"}
            for r in itertools.islice(itertools.cycle(rows), GSM8K_SPLITS[split])]


def offline_stand_ins() -> list[str]:
    """Register stand-in documents for the tasks whose data only the hub serves, where it is unreachable, in this
    process; returns their names (empty when the hub answered)."""
    from .evaluation import tasks

    try:
        tasks.get_task("gsm8k").load("eval")
        return []
    except RuntimeError as e:
        log.warning("%s; the check uses GSM8K-shaped stand-in documents", e)
        tasks.TASK_REGISTRY["gsm8k"] = dataclasses.replace(tasks.TASK_REGISTRY["gsm8k"], load=_gsm8k_stand_in)
        return ["gsm8k"]


# ----------------------------------------------------------------------------------------------------------------
# In the notebook kernel


def _record(path: str, **entry) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def _name(model) -> str:
    return model.config.name_or_path


def install(record: str, models_dir: str | None = None) -> None:
    """Patch the library in this process for a check run (see the module docstring); workloads go to ``record``.

    models_dir: where the shrunk model directories are written (default ``<cache_dir()>/paper-check``)."""
    import routertune_lib

    for info in pkgutil.walk_packages(routertune_lib.__path__, "routertune_lib."):  # every copy of a name is patched
        importlib.import_module(info.name)
    from . import (baselines, calibration, dynamics, evaluation, experiments, models, moe, speed, training,
                   training_cost)
    from .data import cache_dir
    from .model_configs import PAPER_CONFIGS, full_config, save_shrunk, shrunk_config

    offline_stand_ins()
    root = Path(models_dir) if models_dir else cache_dir() / "paper-check"
    load_model, evaluate = models.load_model, evaluation.evaluate
    reference_outputs, fidelity, document_kl = evaluation.reference_outputs, evaluation.fidelity, dynamics.document_kl
    # unlabelled-prompt passes (importance, calibration, executed fractions, expert statistics, real vs masked): the
    # first CHECK_DOCS prompts / one batch
    importance, calibrate = baselines.module_importance, calibration.calibrate_thresholds
    fractions, experts, real_vs_masked = experiments.executed_fractions, moe.expert_statistics, moe.real_vs_masked
    # labelled-conversation passes of the training loss (decision pull, skip effect): one batch
    pull, skip_effect = dynamics.decision_pull, dynamics.skip_effect
    train_routers, compare_settings = training.train_routers, speed.compare_settings
    run_method, measure_method = training_cost.run_method, training_cost.measure_method
    in_cost = [False]  # inside training_cost: its training is recorded as one "cost" entry
    depth = [0]  # patched calls in progress: only the outermost one's wall time is recorded

    def timed(part: str, fn):
        """``fn`` with the wall time of each outermost call recorded as a ``seconds`` entry of ``part``."""
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    _record(record, kind="seconds", part=part, seconds=time.perf_counter() - start)
        return wrapper

    def check_load_model(name_or_path=models.DEFAULT_MODEL, device=None, dtype=None):
        if name_or_path not in PAPER_CONFIGS:
            return load_model(name_or_path, device=device, dtype=dtype)
        depth = full_config(name_or_path).num_hidden_layers  # notebooks route N // 2 or a paper's layer count
        shrunk = shrunk_config(name_or_path, num_layers=depth, hidden_size=CHECK_WIDTH).to_json_string()
        digest = hashlib.sha256(shrunk.encode()).hexdigest()[:8]  # a changed shrink is a new directory
        local = root / f"{name_or_path.replace('/', '__')}-L{depth}-d{CHECK_WIDTH}-{digest}"
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{local.name}.lock", "w") as lock:  # notebooks checked at once build a model once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not local.is_dir():
                save_shrunk(name_or_path, local, num_layers=depth, hidden_size=CHECK_WIDTH)
        model, tokenizer = load_model(str(local), device=device, dtype=dtype or "bfloat16")
        model.config.name_or_path = name_or_path
        _record(record, kind="model", model=name_or_path, device=str(model.device), dtype=str(model.dtype))
        return model, tokenizer

    def check_evaluate(model, tokenizer, tasks=evaluation.PAPER_TASKS, num_fewshot=None, limit=None, *args, **kw):
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        _record(record, kind="eval", model=_name(model), tasks=tasks, shots=num_fewshot, limit=limit,
                batch_size=kw.get("batch_size", 16))
        return evaluate(model, tokenizer, tasks, num_fewshot, min(limit or CHECK_DOCS, CHECK_DOCS), *args, **kw)

    def check_reference_outputs(model, tokenizer, tasks=(), texts=None, *, num_fewshot=None, limit=None, **kw):
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        workload = dict(kind="eval", tasks=tasks, shots=num_fewshot, limit=limit, batch_size=kw.get("batch_size", 16),
                        texts=len(texts or ()), text_tokens=kw.get("text_max_length", 512))
        _record(record, model=_name(model), **workload)
        ref = reference_outputs(model, tokenizer, tasks, None if texts is None else list(texts)[:CHECK_DOCS],
                                num_fewshot=num_fewshot, limit=min(limit or CHECK_DOCS, CHECK_DOCS), **kw)
        ref.config["paper_workload"] = workload  # each fidelity pass on it costs the same
        return ref

    def check_fidelity(model, tokenizer, ref, **kw):
        _record(record, model=_name(model), **ref.config["paper_workload"])
        return fidelity(model, tokenizer, ref, **kw)

    def check_document_kl(dense, models_, tokenizer, texts, max_length=2048, batch_size=8):
        _record(record, kind="eval", model=_name(dense), tasks=[], shots=0, limit=None, batch_size=batch_size,
                texts=len(texts) * (1 + len(models_)), text_tokens=max_length)
        return document_kl(dense, models_, tokenizer, list(texts)[:CHECK_DOCS], max_length, batch_size)

    def first(fn, n: int):
        """``fn(model, data, ...)`` on the first ``n`` items of ``data`` (prompts or batches)."""
        return lambda model, data, *args, **kw: fn(model, list(data)[:n], *args, **kw)

    def one_batch(fn):
        """``fn(model, conversations, tokenizer, max_length, batch_size)`` on the first batch of ``conversations``."""
        def wrapper(model, conversations, tokenizer, max_length=2048, batch_size=8):
            return fn(model, list(conversations)[:batch_size], tokenizer, max_length, batch_size)
        return wrapper

    def check_train_routers(model, tokenizer, dataset, router_config, train_config, **kw):
        micro = train_config.micro_batch_size
        if not in_cost[0]:
            _record(record, kind="tune", model=_name(model), samples=len(dataset), epochs=train_config.epochs,
                    max_length=train_config.max_length, micro_batch=micro)
        one_step = dataclasses.replace(train_config, global_batch_size=micro)
        return train_routers(model, tokenizer, list(dataset)[:micro], router_config, one_step, **kw)

    def check_compare_settings(settings, prompts, batch_size, new_tokens, repeats=3, warmup=1):
        first = next(iter(settings.values()))[0]
        _record(record, kind="speed", model=_name(first), settings=len(settings), prompts=prompts.shape[0],
                prompt_len=prompts.shape[1], batch_size=batch_size, new_tokens=new_tokens, repeats=repeats)
        return compare_settings(settings, prompts[:batch_size], batch_size, min(new_tokens, CHECK_NEW_TOKENS), 1,
                                warmup=min(warmup, 1))

    def check_measure_method(config, method):
        _record(record, kind="cost", model=config.model, method=method, samples=config.samples,
                global_batch=config.global_batch, micro_batch=config.micro_batch, max_length=config.max_length,
                steps_other=config.steps_other)
        small = dataclasses.replace(config, samples=config.micro_batch, global_batch=config.micro_batch,
                                    held_out=2, steps_other=min(config.steps_other, 1))
        in_cost[0] = True
        try:
            return run_method(small, method)  # in this process, so that the patches apply
        finally:
            in_cost[0] = False

    for original, patched, part in (
            (load_model, check_load_model, "load"), (evaluate, check_evaluate, "eval"),
            (reference_outputs, check_reference_outputs, "eval"), (fidelity, check_fidelity, "eval"),
            (document_kl, check_document_kl, "eval"), (train_routers, check_train_routers, "tune"),
            (measure_method, check_measure_method, "cost"), (compare_settings, check_compare_settings, "speed"),
            (importance, first(importance, 1), "prompts"), (calibrate, first(calibrate, CHECK_DOCS), "prompts"),
            (fractions, first(fractions, CHECK_DOCS), "prompts"), (experts, first(experts, CHECK_DOCS), "prompts"),
            (real_vs_masked, first(real_vs_masked, CHECK_DOCS), "prompts"), (pull, one_batch(pull), "prompts"),
            (skip_effect, one_batch(skip_effect), "prompts")):
        _replace_everywhere(original, timed(part, patched))


def _replace_everywhere(original, patched) -> None:
    """Point every ``routertune_lib`` module attribute bound to ``original`` at ``patched`` (``from x import f`` makes
    copies of the name)."""
    for name, module in list(sys.modules.items()):
        if name == "routertune_lib" or name.startswith("routertune_lib."):
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, patched)


# ----------------------------------------------------------------------------------------------------------------
# Running the notebooks


def _with_install_cell(notebook: Path, record: Path, models_dir: Path | None) -> dict:
    """The notebook's JSON with a code cell calling :func:`install` right after its ``parameters`` cell."""
    nb = json.loads(notebook.read_text())
    cells = nb["cells"]
    at = next((i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if at is None:
        raise ValueError(f"{notebook.name} has no cell tagged 'parameters'")
    source = (f"from routertune_lib.paper_check import install\n"
              f"install({str(record)!r}, {None if models_dir is None else str(models_dir)!r})")
    cells.insert(at + 1, {"cell_type": "code", "execution_count": None, "id": "paper-check-install",
                          "metadata": {"tags": ["paper-check"]}, "outputs": [], "source": source})
    return nb


def _execute(source: str, executed: str, cwd: str, progress_bar: bool) -> tuple[str | None, float]:
    """Run one notebook with papermill in the ``paper`` profile (in a worker process of :func:`check_notebooks`):
    ``(None or the notebook's error, wall seconds)``. Any exception (a failed cell, a kernel that died) is the
    notebook's error, so that the others still run."""
    import papermill as pm

    start = time.perf_counter()
    error = None
    try:
        pm.execute_notebook(source, executed, parameters={"profile": "paper"}, cwd=cwd, progress_bar=progress_bar)
    except pm.PapermillExecutionError as err:
        error = f"{err.ename}: {err.evalue} (cell {err.exec_count}; see {executed})"
    except Exception as err:  # e.g. the kernel died (out of memory)
        error = f"{type(err).__name__}: {err} (see {executed})"
    return error, time.perf_counter() - start


def check_notebooks(notebooks_dir: Path, only: list[str] | None = None, out_dir: Path | None = None,
                    models_dir: Path | None = None, jobs: int | None = None) -> dict[str, dict]:
    """Run each notebook (``only``: their stems) in the ``paper`` profile with :func:`install`; executed copies go to
    ``out_dir`` (default ``<cache_dir()>/paper-check/executed``), results under ``out_dir/results`` (never the
    paper results). Returns ``{notebook: {"records": [workload records], "error": None or the notebook's
    exception, "seconds": its wall time}}`` in name order; a failing notebook does not stop the others.

    jobs: notebooks run at once (default: one per CPU core, at most the number of notebooks), each kernel with
    ``cores // jobs`` torch threads (``OMP_NUM_THREADS``): the shrunk models' small matrices gain little from more
    threads, and threads that share a core with another process wait on each other (ten times slower). The kernels'
    glibc keeps freed blocks up to :data:`KEEP_FREED_BYTES` for reuse (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``): the shrunk models' full-vocabulary logits are gigabytes per batch, and mapping them
    fresh each time spent more time in page faults than in the model."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from .data import cache_dir

    out_dir = out_dir or cache_dir() / "paper-check" / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = [nb for nb in sorted(notebooks_dir.glob("[0-9]*.ipynb")) if not only or nb.stem in only]
    cores = os.cpu_count() or 1
    jobs = max(1, min(jobs or cores, len(notebooks)))
    library = str(Path(__file__).resolve().parent.parent)  # the kernel imports this checkout's routertune_lib
    env = {"ROUTERTUNE_RESULTS": str(out_dir / "results"), "OMP_NUM_THREADS": str(max(1, cores // jobs)),
           **{k: str(KEEP_FREED_BYTES) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
           "PYTHONPATH": os.pathsep.join(filter(None, [library, os.environ.get("PYTHONPATH")]))}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the workers and their kernels inherit them
    try:
        with tempfile.TemporaryDirectory(prefix="paper-check-") as tmp, \
                ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            runs = {}
            for nb in notebooks:
                record = Path(tmp) / f"{nb.stem}.jsonl"
                record.touch()
                source = Path(tmp) / nb.name
                source.write_text(json.dumps(_with_install_cell(nb, record, models_dir)))
                log.info("check %s (profile paper, shrunk models) -> %s", nb.name, out_dir / nb.name)
                runs[nb.stem] = record, pool.submit(_execute, str(source), str(out_dir / nb.name),
                                                    str(notebooks_dir), jobs == 1)
            names = {future: name for name, (_, future) in runs.items()}
            for future in as_completed(names):
                error, seconds = future.result()
                if error:
                    log.error("%s failed after %.0f s: %s", names[future], seconds, error)
                else:
                    log.info("%s passed in %.0f s", names[future], seconds)
            records: dict[str, dict] = {}
            for name, (record, future) in runs.items():
                error, seconds = future.result()
                records[name] = {"records": [json.loads(line) for line in record.read_text().splitlines()],
                                 "error": error, "seconds": seconds}
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return records


# ----------------------------------------------------------------------------------------------------------------
# GPU estimates


class _Tokens:
    """Mean token counts with the stand-in tokenizer (cached per task / data source)."""

    def __init__(self):
        from .model_configs import stand_in_tokenizer

        self.tok = stand_in_tokenizer()
        self._prompt: dict[str, float] = {}
        self._conv: dict[tuple, tuple[float, int]] = {}

    def prompt(self, task: str, shots: int) -> float:
        from .evaluation import task_prompts

        if task not in self._prompt:
            texts = task_prompts(task, PROMPT_SAMPLE)
            self._prompt[task] = sum(len(self.tok(t)["input_ids"]) for t in texts) / len(texts)
        return self._prompt[task] * (1 + shots)  # a few-shot example is about as long as a question

    def conversations(self, source: str, max_length: int) -> tuple[float, int]:
        """(mean, longest) tokens of 64 conversations of ``source`` rendered with the chat template, capped at
        ``max_length`` (the estimate uses the offline mix for every source)."""
        from .data import load_instruction_data

        if (source, max_length) not in self._conv:
            rendered = [self.tok.apply_chat_template(c["messages"], return_dict=True)["input_ids"]
                        for c in load_instruction_data(source, limit=64)]
            lengths = [min(len(ids), max_length) for ids in rendered]
            self._conv[source, max_length] = (sum(lengths) / len(lengths), max(lengths))
        return self._conv[source, max_length]


def _docs(task: str, limit: int | None) -> int:
    from .evaluation import task_docs

    n = len(task_docs(task)[0])
    return n if limit is None else min(limit, n)


def _shots(task: str, shots) -> int:
    from .evaluation import get_task

    if shots is None:
        return get_task(task).num_fewshot
    return shots.get(task, get_task(task).num_fewshot) if isinstance(shots, dict) else int(shots)


def estimate(records: list[dict], tokens: _Tokens | None = None) -> dict:
    """GPU seconds and peak bytes of one notebook's paper-size workload ``records`` (see the module docstring):
    ``{"gpu_s", "peak_bytes", "fits", "models", "parts": {kind: seconds}}``."""
    from .evaluation import get_task
    from .model_configs import full_config, full_size

    tokens = tokens or _Tokens()
    flops_per_s = GPU["peak_flops"] * GPU["mfu"]
    parts: dict[str, float] = {}
    peak, models = 0.0, set()
    for r in records:
        if r["kind"] not in WORKLOADS or r["model"] is None:  # model loads, check seconds
            continue
        try:
            size, config = full_size(r["model"]), full_config(r["model"])
        except KeyError:  # not a paper model (e.g. a built-in one): not estimated
            continue
        models.add(r["model"])
        head = config.vocab_size * config.hidden_size
        body = size.active - size.embedding - (0 if config.tie_word_embeddings else head)
        weights = 2.0 * size.params
        step_s = weights / GPU["hbm_bytes_per_s"]  # one memory-bound decode step
        seconds, extra = 0.0, 0.0
        if r["kind"] == "eval":
            for task in r["tasks"]:
                k, n = _shots(task, r["shots"]), _docs(task, r["limit"])
                seconds += 2 * body * n * tokens.prompt(task, k) / flops_per_s
                spec = get_task(task)
                if spec.output_type == "generate_until":
                    seconds += math.ceil(n / r["batch_size"]) * spec.max_new_tokens * step_s
            seconds += 2 * body * r.get("texts", 0) * r.get("text_tokens", 0) / flops_per_s  # held-out texts
        elif r["kind"] in ("tune", "cost"):
            mean, longest = tokens.conversations("offline-mix", r["max_length"])
            if r["kind"] == "tune":
                toks, factor = r["samples"] * r["epochs"] * mean, 4
            else:
                steps = r["samples"] // r["global_batch"]
                run = steps if r["method"] == "routers" or not r["steps_other"] else min(r["steps_other"], steps)
                toks, factor = run * r["global_batch"] * mean, 6 if r["method"] == "full" else 4
            seconds += factor * (body + head) * toks / flops_per_s
            extra = r["micro_batch"] * longest * (size.num_layers * ACT_BYTES_PER_HIDDEN * config.hidden_size
                                                  + 6 * config.vocab_size)
            if r["kind"] == "cost" and r["method"] == "full":
                extra += 12.0 * size.params
        elif r["kind"] == "speed":
            batches = math.ceil(r["prompts"] / r["batch_size"])
            per_run = 2 * body * r["prompts"] * r["prompt_len"] / flops_per_s + batches * r["new_tokens"] * step_s
            seconds += r["settings"] * r["repeats"] * per_run
            extra = r["batch_size"] * (r["prompt_len"] + r["new_tokens"]) * size.kv_bytes_per_token
        parts[r["kind"]] = parts.get(r["kind"], 0.0) + seconds
        peak = max(peak, weights + extra)
    return {"gpu_s": sum(parts.values()), "peak_bytes": peak, "fits": peak <= GPU["memory_bytes"],
            "models": sorted(models), "parts": parts}


def report(records: dict[str, dict]) -> list[str]:
    """One line per notebook: FAILED with its error, or passed, and its wall time on this machine (by part: the
    patched calls', and other: kernel start, imports, the notebook's own code); models,
    estimated GPU hours (by part) and peak memory on :data:`GPU` (of the workload recorded up to a failure)."""
    tokens = _Tokens()
    lines = [f"Estimated for the real models on one {GPU['name']} ({GPU['mfu']:.0%} of {GPU['peak_flops'] / 1e12:.0f}"
             f" TFLOP/s bf16, {GPU['hbm_bytes_per_s'] / 1e12:.1f} TB/s; formulas: routertune_lib/paper_check.py):"]
    for nb, run in records.items():
        e = estimate(run["records"], tokens)
        parts = ", ".join(f"{k} {v / 3600:.2f} h" for k, v in e["parts"].items())
        seconds, spent = run.get("seconds"), {}
        for r in run["records"]:
            if r["kind"] == "seconds":
                spent[r["part"]] = spent.get(r["part"], 0.0) + r["seconds"]
        took = "" if seconds is None else (f" {'after' if run['error'] else 'in'} {seconds:.0f} s ("
                                           + "".join(f"{k} {v:.0f} s, " for k, v in spent.items())
                                           + f"other {seconds - sum(spent.values()):.0f} s)")
        status = f"FAILED{took} {run['error']}\n    (up to the failure) " if run["error"] else f"passed{took}; "
        lines.append(f"  {nb}: {status}{e['gpu_s'] / 3600:.2f} GPU-h ({parts}); peak memory "
                     f"{e['peak_bytes'] / 1e9:.0f} GB{'' if e['fits'] else ' -- EXCEEDS ONE GPU'}; models "
                     f"{', '.join(e['models'])}")
    return lines


def run_check(notebooks_dir: Path, only: list[str] | None = None, out_dir: Path | None = None,
              jobs: int | None = None) -> bool:
    """:func:`check_notebooks` then :func:`report` (printed, with the check's wall time); True when every notebook
    passed."""
    start = time.perf_counter()
    records = check_notebooks(notebooks_dir, only, out_dir, jobs=jobs)
    wall = time.perf_counter() - start
    stand_ins = offline_stand_ins()  # the estimate reads the same documents as the kernels did
    print("\n".join(report(records)), flush=True)
    print(f"checked {len(records)} notebooks in {wall:.0f} s wall ({sum(r['seconds'] for r in records.values()):.0f} s "
          f"of notebook time) on {os.cpu_count()} cores")
    if stand_ins:
        print(f"stand-in documents (hub unreachable): {', '.join(stand_ins)}; their token counts are the stand-in's")
    return not any(run["error"] for run in records.values())


__all__ = ["CHECK_DOCS", "GPU", "check_notebooks", "estimate", "install", "report", "run_check"]
