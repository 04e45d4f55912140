"""Shared building blocks of the studies (:mod:`routertune_lib.studies`): cached router tuning, tables, speed-ups.

* :func:`tuned_routers` trains routers once per (model, router config, train config, data) and caches the checkpoint
  under ``<cache_dir()>/routers/<key>.safetensors``, so notebooks that need the same routers share one training run.
* :func:`comparison_frame` / :func:`accuracy_table` turn :func:`routertune_lib.evaluation.compare` output into tidy
  DataFrames (task columns, average, difference to a baseline with its paired 95% CI).
* :func:`measure_speedups` times routed / static-drop models against the dense model (end-to-end generation, real
  skipping) with :func:`routertune_lib.speed.compare_settings`.
* :data:`PROFILES` holds the model and training settings every notebook of a profile shares (so their cache keys
  match); the paper's reported numbers are reference data in :mod:`routertune_lib.paper`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

from .batching import forward_batches
from .data import cache_dir, load_instruction_data
from .evaluation import PAPER_TASKS, EvalResults, compare, model_fingerprint
from .models import BUILTIN_MODELS, load_model, model_identity, shared_copy, tiny_random_model
from .reporting import write_atomic
from .routing import RouterConfig, RoutingContext, RoutingTrace, detach_routers, routed_layers
from .speed import compare_settings, prompt_pool
from .training import TrainConfig, train_routers

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Profiles shared by the notebooks (model + router-tuning data/budget; evaluation sizes live in each notebook)

PROFILES: dict[str, dict] = {
    # tiny random Llama (SmolLM2 tokenizer): seconds; numbers are meaningless, the code path is the real one
    "smoke": dict(model=None, train_samples=16, calib_samples=8, max_length=128, global_batch=8, micro_batch=4,
                  lr=1e-3, mixed_precision="no"),
    # SmolLM2-135M on 2 CPU cores: the training budget is what one notebook can afford six times (16 steps, ~80 s)
    "cpu": dict(model="smollm2-135m", train_samples=256, calib_samples=96, max_length=128, global_batch=16,
                micro_batch=8, lr=1e-3, mixed_precision="no"),
    # the paper's setting (released script: 1000 samples, lr 1e-5, global batch 64, max length 2048, bf16)
    "paper": dict(model="meta-llama/Meta-Llama-3-8B", train_samples=1000, calib_samples=256, max_length=2048,
                  global_batch=64, micro_batch=8, lr=1e-5, mixed_precision="bf16"),
}


def profile_settings(profile: str) -> dict:
    """A copy of ``PROFILES[profile]``; unknown profiles raise ``ValueError`` listing the valid ones."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; valid profiles: {sorted(PROFILES)}")
    return dict(PROFILES[profile])


def profile_train_config(profile: str, **overrides) -> TrainConfig:
    """The ``TrainConfig`` of a profile (lr, batch sizes, max length, precision); ``overrides`` win."""
    s = profile_settings(profile)
    kw = dict(learning_rate=s["lr"], global_batch_size=s["global_batch"], micro_batch_size=s["micro_batch"],
              max_length=s["max_length"], mixed_precision=s["mixed_precision"], seed=0)
    return TrainConfig(**{**kw, **overrides})


TINY_RANDOM_PREFIX = "tiny-random-"


def load_base_model(model_name: str | None, **kwargs):
    """``(model, tokenizer)``: ``tiny_random_model()`` for ``None`` (smoke); for ``"tiny-random-<builtin>"`` (e.g.
    ``"tiny-random-gemma3-270m"``, the ``name_or_path`` such a model reports) ``tiny_random_model(tokenizer_from=
    <builtin>)``, a tiny random model of that builtin's architecture (smoke runs of other architectures); else
    ``load_model(model_name)``."""
    if model_name is None:
        return tiny_random_model()
    if model_name.startswith(TINY_RANDOM_PREFIX):
        base = model_name[len(TINY_RANDOM_PREFIX):]
        if base not in BUILTIN_MODELS:
            raise ValueError(f"{model_name!r}: tiny random models exist for the builtin models only; use one of "
                             f"{[TINY_RANDOM_PREFIX + b for b in sorted(BUILTIN_MODELS)]}")
        return tiny_random_model(tokenizer_from=base)
    return load_model(model_name, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Cached router tuning

# TrainConfig fields that do not change the trained routers (location, checkpointing, memory split)
_NOT_IN_KEY = ("output_dir", "save_every", "micro_batch_size")
# options added after routers were first cached: left out of the key at these defaults (which reproduce the older
# runs exactly), so routers tuned before the options existed stay valid
_NEW_OPTION_DEFAULTS = {"capacity_loss": "hinge", "capacity_weight_lr": 2.0, "router_bias": False,
                        "training_forward": "masked"}


def _without_new_defaults(d: dict) -> dict:
    return {k: v for k, v in d.items() if not (k in _NEW_OPTION_DEFAULTS and v == _NEW_OPTION_DEFAULTS[k])}


def _data_identity(data_source) -> dict:
    ident = {"source": str(data_source)}
    path = Path(str(data_source))
    if path.suffix in (".json", ".jsonl") and path.is_file():
        ident["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return ident


def router_cache_key(model, router_config: RouterConfig, train_config: TrainConfig, data_source, num_samples: int,
                     seed: int) -> tuple[str, dict]:
    """``(hex digest, key dict)`` identifying a tuning run: base model (identity + weight fingerprint), router config,
    trajectory-defining train config fields, and the data (source, sample count, shuffle seed)."""
    fp = model_fingerprint(model)
    key = {
        "model": {**model_identity(model), **{k: fp[k] for k in ("dtype", "params", "weights")}},
        "router_config": _without_new_defaults(asdict(router_config)),
        "train_config": _without_new_defaults({k: v for k, v in train_config.to_dict().items()
                                               if k not in _NOT_IN_KEY}),
        "data": {**_data_identity(data_source), "num_samples": num_samples, "seed": seed},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return digest, key


def tuned_routers(
    model_name: str | None,
    router_config: RouterConfig,
    train_config: TrainConfig,
    data_source: str = "offline-mix",
    num_samples: int = 1000,
    seed: int = 0,
    *,
    model=None,
    tokenizer=None,
) -> Path:
    """Router checkpoint for ``model_name`` tuned with these settings, trained on first use and cached.

    The checkpoint is ``<cache_dir()>/routers/<key>.safetensors`` (written atomically; a ``.json`` beside it records
    the key and the training summary, see :func:`router_record`; ``<key>.train_log.csv`` keeps the per-step log).
    With ``train_config.lora`` the LoRA adapter trained with the routers is kept beside it as ``<key>.adapter/``
    (peft ``save_pretrained``; see :func:`tuned_adapter`, :func:`merge_adapter`); with ``train_routers=False`` as
    well, the routers stay at their zero initialisation (every input executed, i.e. exactly the dense model), so the
    run is LoRA alone. Training data: the first ``num_samples`` conversations of
    ``load_instruction_data(data_source, seed=seed)``; calibrate thresholds on evaluation-style text
    (``evaluation.task_prompts``), not on these conversations.

    model_name: a ``load_model`` name, or ``None`` for ``tiny_random_model()`` (smoke runs).
    model, tokenizer: an already loaded copy of that model (without routers) to avoid loading it again; it is trained
        in place and its routers (and LoRA layers, peft ``unload``) are removed afterwards, so it is returned to the
        caller dense. Should training raise, the routers are removed but LoRA layers peft injected may remain: load the
        model again before using it.
    A file lock serialises concurrent calls with the same key (e.g. two notebooks), so training happens once.
    """
    if model is None:
        model, tokenizer = load_base_model(model_name)
    elif tokenizer is None:
        raise ValueError("tuned_routers: pass the tokenizer together with the model")
    if getattr(model, "routertune", None) is not None:
        raise ValueError("tuned_routers needs the model without routers; call detach_routers(model) first")
    digest, key = router_cache_key(model, router_config, train_config, data_source, num_samples, seed)
    root = cache_dir() / "routers"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{digest}.safetensors"
    with open(root / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            log.info("tuned_routers: cached %s", path)
            return path
        data = load_instruction_data(data_source, limit=num_samples, seed=seed)
        work = Path(tempfile.mkdtemp(dir=root, prefix=f".{digest}.work-"))
        result = None
        try:
            result = train_routers(model, tokenizer, data, router_config,
                                   replace(train_config, output_dir=str(work)))
            record = {"key": key, "steps": result.steps, "wall_time_s": result.wall_time_s,
                      "tokens_per_s": result.tokens_per_s, "final_capacity": result.final_capacity,
                      "final_loss": result.final_loss, "trainable_parameters": result.trainable_parameters}
            train_log = root / f"{digest}.train_log.csv"  # per-step losses, capacities and lambda (the trajectory)
            shutil.copyfile(result.log_path.with_suffix(".csv"), train_log)
            record["train_log"] = str(train_log)
            tmp = root / f".{digest}.safetensors.tmp"
            shutil.copyfile(result.router_path, tmp)
            if result.adapter_path is not None:  # the adapter goes into place before the checkpoint that marks a hit
                adapter = _adapter_dir(path)
                shutil.rmtree(adapter, ignore_errors=True)
                Path(result.adapter_path).rename(adapter)  # work/adapter, same file system
                record["adapter"] = str(adapter)
            write_atomic(path.with_suffix(".json"), json.dumps(record, indent=2, default=str) + "\n")
            tmp.replace(path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if result is not None:
                _unload_lora(result.model)
            if getattr(model, "routertune", None) is not None:
                detach_routers(model)
    log.info("tuned_routers: trained %s in %.1f s", path, record["wall_time_s"])
    return path


def _adapter_dir(router_path: Path) -> Path:
    return router_path.with_suffix(".adapter")


def _unload_lora(trained) -> None:
    """Undo ``train_routers``' LoRA injection without merging (peft ``PeftModel.unload``): the wrapped model gets its
    base layers back, so it computes what it did before. ``trained`` is ``TrainResult.model``; a model trained
    without LoRA is left as is."""
    from peft import PeftModel

    if isinstance(trained, PeftModel):
        trained.unload()  # also removes the peft_config peft copied onto the model


def tuned_adapter(path: str | Path) -> Path | None:
    """The LoRA adapter directory cached with the router checkpoint ``path`` of :func:`tuned_routers`, or ``None``
    when that run trained no LoRA."""
    adapter = _adapter_dir(Path(path))
    return adapter if adapter.is_dir() else None


def merge_adapter(model, adapter_path: str | Path):
    """Merge a peft LoRA adapter (a ``save_pretrained`` directory, e.g. :func:`tuned_adapter`) into ``model``'s
    weights in place (peft ``merge_and_unload``) and return ``model``: it keeps the base architecture and parameter
    names (so it runs, and is timed, like the dense model) and any routers it carries."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    if merged is not model:
        raise RuntimeError("peft returned a new model object instead of merging in place")
    return model


def router_record(path: str | Path) -> dict:
    """The key and training summary (steps, wall_time_s, final_capacity, ...) stored beside a cached checkpoint."""
    return json.loads(Path(path).with_suffix(".json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# Baselines and routing statistics


def conversation_batches(conversations, tokenizer, max_length: int, batch_size: int = 8, device=None) -> list[dict]:
    """Right-padded batches ``{input_ids, attention_mask}`` of conversations (chat template), plain texts or ready
    batches (for ``module_importance``, ``calibrate_thresholds``, :func:`executed_fractions`)."""
    return forward_batches(conversations, tokenizer, batch_size, max_length, device or torch.device("cpu"))


def randomize_routers(model, seed: int = 0) -> None:
    """Replace every router's weights by seeded Gaussian noise (std 1/sqrt(d)): the random-routing control."""
    g = torch.Generator().manual_seed(seed)
    for layer in routed_layers(model).values():
        w = layer.router.weight
        w.data.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)


@torch.no_grad()
def executed_fractions(model, data, tokenizer=None, max_length: int = 2048, batch_size: int = 8) -> dict:
    """``{"layers": {layer: executed fraction}, "overall": fraction}`` of a routed model on ``data`` (conversations
    with ``tokenizer``, or ``input_ids`` batches), in the model's routing mode."""
    device = next(model.parameters()).device
    counts: dict[int, list[float]] = {}
    for b in conversation_batches(data, tokenizer, max_length, batch_size, device):
        ctx = RoutingContext(model.routertune.mode, b["attention_mask"], RoutingTrace())
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], routing_context=ctx, use_cache=False)
        for layer, (e, n) in ctx.trace.counts().items():
            c = counts.setdefault(layer, [0.0, 0.0])
            c[0], c[1] = c[0] + e, c[1] + n
    return {"layers": {i: e / max(n, 1.0) for i, (e, n) in sorted(counts.items())},
            "overall": sum(e for e, _ in counts.values()) / max(sum(n for _, n in counts.values()), 1.0)}


def overall_skip(results: EvalResults, num_hidden_layers: int) -> float:
    """Share of all layers' (gated module) executions skipped during an evaluation: routed layers' skipped fraction
    times routed layers / all layers (0.0 for a dense model)."""
    return skipped_share(results.routing, num_hidden_layers)


def skipped_share(routing: dict, num_hidden_layers: int) -> float:
    """Share of all layers' executions skipped in a pass, from its ``RoutingStats.summary()`` (0.0 when empty)."""
    return sum(1.0 - f for f in routing.get("layers", {}).values()) / num_hidden_layers


# ----------------------------------------------------------------------------------------------------------------
# Tables from compare()


def comparison_frame(paired: dict, scale: float = 100.0) -> pd.DataFrame:
    """Long form of ``compare(a, b)``: one row per task plus an ``average`` row.

    Columns: task, metric, n, a, b, diff, ci_low, ci_high, agreement (accuracies and differences times ``scale``;
    the average row's a/b are the unweighted means over the compared tasks).
    """
    rows = [{"task": t, "metric": r["metric"], "n": r["n"], "a": scale * r["a"], "b": scale * r["b"],
             "diff": scale * r["diff"], "ci_low": scale * r["ci_low"], "ci_high": scale * r["ci_high"],
             "agreement": scale * r["agreement"]} for t, r in paired["tasks"].items()]
    if paired.get("average"):
        avg = paired["average"]
        rows.append({"task": "average", "metric": "mean", "n": sum(r["n"] for r in rows),
                     "a": sum(r["a"] for r in rows) / len(rows), "b": sum(r["b"] for r in rows) / len(rows),
                     "diff": scale * avg["diff"], "ci_low": scale * avg["ci_low"], "ci_high": scale * avg["ci_high"],
                     "agreement": sum(r["agreement"] for r in rows) / len(rows)})
    return pd.DataFrame(rows, columns=["task", "metric", "n", "a", "b", "diff", "ci_low", "ci_high", "agreement"])


def accuracy_table(results: dict[str, EvalResults], baseline: str, scale: float = 100.0, n_boot: int = 10000,
                   seed: int = 0) -> pd.DataFrame:
    """Wide form: one row per setting of ``results`` (``{name: EvalResults}``, in order).

    Columns: setting, one column per task (its paper metric), avg (mean over those tasks), diff / ci_low / ci_high
    (paired bootstrap of the average difference to ``results[baseline]``; 0 for the baseline itself) and executed
    (executed fraction over routed layers during the evaluation; 1.0 without routers).
    """
    if baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not among the settings {list(results)}")
    base = results[baseline]
    tasks = [t for t in base.tasks if all(t in r.tasks for r in results.values())]
    rows = []
    for name, r in results.items():
        row = {"setting": name, **{t: scale * r.tasks[t].score for t in tasks}}
        row["avg"] = sum(row[t] for t in tasks) / len(tasks) if tasks else float("nan")
        if name == baseline:
            row.update(diff=0.0, ci_low=0.0, ci_high=0.0)
        else:
            avg = compare(base, r, n_boot=n_boot, seed=seed)["average"]
            row.update(diff=scale * avg["diff"], ci_low=scale * avg["ci_low"], ci_high=scale * avg["ci_high"])
        row["executed"] = r.routing.get("overall", 1.0)
        rows.append(row)
    return pd.DataFrame(rows)


def paper_tasks_mean(values: dict[str, float], tasks) -> float | None:
    """Mean of a paper row's ``values`` over ``tasks`` (None when the paper reports none of them)."""
    got = [values[t] for t in tasks if t in values]
    return sum(got) / len(got) if got else None


# ----------------------------------------------------------------------------------------------------------------
# Speed-up


def measure_speedups(dense, models: dict, prompts: torch.Tensor | None = None, *, batch_size: int = 4,
                     new_tokens: int = 32, repeats: int = 3, prompt_len: int = 128, num_prompts: int = 8,
                     seed: int = 0) -> pd.DataFrame:
    """End-to-end generation speed-up of each ``{name: model}`` over ``dense`` (routed models run with real
    skipping; a model without routers runs as is). All settings are interleaved in one ``compare_settings`` call.

    prompts: ``[P, T]`` token ids, default a seeded random pool of ``num_prompts`` x ``prompt_len``.
    Returns the ``SpeedRow`` columns (``speedup``: median over rounds of dense / this setting's generate time in
    the same round, with ``speedup_ci_low`` / ``speedup_ci_high``) plus ``kv_ratio`` (KV-cache bytes / dense's).
    """
    if prompts is None:
        prompts = prompt_pool(dense.config.vocab_size, num_prompts, prompt_len, seed=seed)
    settings = {"dense": (dense, None)}
    for name, m in models.items():
        if name == "dense":
            raise ValueError("'dense' is reserved for the baseline")
        settings[name] = (m, "real" if getattr(m, "routertune", None) is not None else None)
    rows = pd.DataFrame([r.as_dict() for r in compare_settings(settings, prompts, batch_size, new_tokens, repeats)])
    rows["kv_ratio"] = rows.kv_bytes / rows.kv_bytes.iloc[0]
    return rows


def speedup_cells(row, name: str = "speedup") -> dict:
    """``{name, name ci_low, name ci_high}`` of a ``measure_speedups`` row (its median-of-rounds speed-up and 95%
    CI); ``row=None`` is the dense baseline (1.0, exactly)."""
    if row is None:
        return {name: 1.0, f"{name} ci_low": 1.0, f"{name} ci_high": 1.0}
    return {name: row["speedup"], f"{name} ci_low": row["speedup_ci_low"], f"{name} ci_high": row["speedup_ci_high"]}


@contextlib.contextmanager
def routed_copy(model, router_path: str | Path | None = None, adapter_path: str | Path | None = None):
    """A copy of ``model`` with ``load_routers(copy, router_path)`` (when given), freed on exit. Its modules are new
    but, without an adapter, it shares ``model``'s parameters and buffers (no memory for the weights, so several
    settings can be held and timed side by side); with the LoRA adapter ``adapter_path`` it is a deep copy with the
    adapter merged into its weights (:func:`merge_adapter`). Never change the weights of a shared copy in place."""
    from .routing import load_routers

    if adapter_path is None:
        m = shared_copy(model)
    else:
        m = copy.deepcopy(model)
        merge_adapter(m, adapter_path)
    if router_path is not None:
        load_routers(m, router_path)
    try:
        yield m
    finally:
        del m
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = [
    "PAPER_TASKS", "PROFILES", "accuracy_table",
    "comparison_frame", "conversation_batches", "executed_fractions", "load_base_model", "measure_speedups",
    "merge_adapter",
    "overall_skip", "paper_tasks_mean", "profile_settings", "profile_train_config", "randomize_routers",
    "routed_copy", "router_cache_key", "router_record", "tuned_adapter", "tuned_routers",
]
