"""Router-Tuning: train the routers (and optionally LoRA adapters) of a frozen decoder on chat data.

One explicit loop, ``train_routers``, built on ``accelerate.Accelerator`` so the same code runs on CPU, one GPU or
many (``accelerate launch`` / ``torchrun``: DDP, or FSDP/DeepSpeed from the user's accelerate config). Per optimizer
step it computes, over the global batch of ``global_batch_size`` conversations,

    L = CE(assistant tokens) / #assistant tokens                      (token mean over the whole global batch)
      + mean_over_micro_batches capacity_penalty(m)

    capacity_penalty(m) = capacity_weight * ReLU(capacity_m - capacity)          capacity_loss="hinge" (the paper)
                        = capacity_weight * sum_l capacity_{m,l}                 capacity_loss="linear" (released code)
                        = lambda_t * (capacity_m - capacity)                     capacity_loss="dual"
    lambda_{t+1} = lambda_t + capacity_weight_lr * (capacity_t - capacity),      lambda_0 = capacity_weight

where ``capacity_m`` is the executed fraction over routed layers of micro-batch ``m`` (``RoutingTrace.capacity``) and
``capacity_{m,l}`` that of routed layer ``l``, both carrying the straight-through gradient; ``capacity_t`` is the
executed fraction of step ``t``'s whole global batch (hard decisions), and ``lambda_t`` is logged and checkpointed.
Both terms are normalised over the global batch, not per micro-batch or per process, so the gradient does not depend
on ``micro_batch_size`` or on the number of processes (up to float error). ``TrainConfig.training_forward`` chooses
how routed layers execute while their routers train: ``masked`` (every input computed) or ``real`` (kept inputs only;
see ``routing``).

``calibrate_thresholds`` (``calibration``, re-exported here) then sets per-layer thresholds so a trained router hits any
requested capacity. The settings are ``train_config``'s ``TrainConfig`` and ``LoraSettings``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, gather_object, get_int_from_env, set_seed
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .architectures import base_model
from .batching import IGNORE_INDEX, collate, num_labels, pad_id, tokenize_conversations
from .calibration import calibrate_thresholds, threshold_for
from .reporting import write_atomic
from .routing import (
    RouterConfig,
    RoutingContext,
    RoutingTrace,
    attach_routers,
    load_router_state,
    router_parameters,
    routed_layers,
    save_routers,
)
from .train_config import LoraSettings, TrainConfig, TrainResult

logger = logging.getLogger(__name__)

# TrainConfig fields that define the training trajectory: on resume the checkpoint's values win (with a warning).
_TRAJECTORY_FIELDS = (
    "learning_rate", "weight_decay", "adam_betas", "adam_eps", "warmup_ratio", "epochs", "global_batch_size",
    "max_length", "max_grad_norm", "seed", "lora", "train_routers", "training_forward",
)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and logs


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (``checkpoints/step-NNNNNN`` with a ``trainer_state.pt``), oldest first."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _reconcile(name: str, given: dict, saved: dict, keys) -> dict:
    """Checkpoint values for ``keys`` where they differ from ``given`` (warned); ``{key: saved value}``."""
    changed = {k: saved[k] for k in keys if given[k] != saved[k]}
    for k, v in changed.items():
        logger.warning("resume: %s.%s=%r differs from the checkpoint's %r; keeping the checkpoint's", name, k, given[k], v)
    return changed


class _StepLog:
    """Per-step rows appended to ``train_log.jsonl`` and ``train_log.csv`` (main process only).

    Each row is written with one ``write`` and flushed. On resume both files are first cut back to the checkpoint's
    step (rewritten to a temporary file, then renamed), so steps redone after an interruption are not duplicated.
    """

    def __init__(self, output_dir: Path, columns: list[str], start_step: int, enabled: bool):
        self.jsonl, self.csv, self.columns, self.enabled = output_dir / "train_log.jsonl", output_dir / "train_log.csv", columns, enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and self.jsonl.is_file():
            kept = [r for r in map(json.loads, self.jsonl.read_text().splitlines()) if r["step"] <= start_step]
        write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        write_atomic(self.csv, self._csv_line(columns) + "".join(self._csv_line([r.get(c) for c in columns]) for r in kept))

    @staticmethod
    def _csv_line(values) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()


    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        for path, line in ((self.jsonl, json.dumps(row) + "\n"), (self.csv, self._csv_line([row.get(c) for c in self.columns]))):
            with open(path, "a") as f:
                f.write(line)
                f.flush()


# ----------------------------------------------------------------------------------------------------------------
# Training: train_routers reads as its steps (setup, data, model, loop with _train_step, checkpoint, result)


def _check_router_setup(model: nn.Module, config: RouterConfig) -> None:
    """Attach routers per ``config`` if the model has none; else check the attached ones match it."""
    setup = getattr(model, "routertune", None)
    if setup is None:
        attach_routers(model, config)
        return
    want = (config.target, config.level, config.resolve_layers(model.config.num_hidden_layers), False)
    have = (setup.config.target, setup.config.level, setup.layers, setup.static)
    thresholds = {layer.routing.threshold for layer in routed_layers(model).values()}
    if want != have or thresholds != {config.threshold}:
        raise ValueError(
            f"The model's routers (target, level, layers, static_drop = {have}, thresholds {sorted(thresholds)}) do "
            f"not match the RouterConfig given to train_routers ({want}, threshold {config.threshold}); "
            "detach_routers(model) first or pass the matching RouterConfig."
        )


@dataclass
class _Run:
    """One call's settings after setup: the configs (the checkpoint's trajectory values on resume), the checkpoint
    resumed from and its ``trainer_state.pt``, the accelerator, ``world`` processes and ``accum`` micro-batches per
    process per step."""

    cfg: TrainConfig
    rcfg: RouterConfig
    output_dir: Path
    resumed_from: Path | None
    state: dict | None
    accelerator: Accelerator
    world: int
    accum: int


def _setup(cfg: TrainConfig, rcfg: RouterConfig, resume: bool) -> _Run:
    """Resume reconciliation, the accelerator (checked against the launch and the precision), the seed."""
    output_dir = Path(cfg.output_dir)
    found = _checkpoints(output_dir)
    state = None
    if resume and found:
        state = torch.load(found[-1] / "trainer_state.pt", map_location="cpu", weights_only=False)
        # the saved configs through their classes: fields added since the checkpoint was written take their defaults
        given, saved = cfg.to_dict(), TrainConfig.from_dict(state["train_config"]).to_dict()
        cfg = TrainConfig.from_dict({**given, **_reconcile("TrainConfig", given, saved, _TRAJECTORY_FIELDS)})
        given, saved = asdict(rcfg), asdict(RouterConfig.from_dict(state["router_config"]))
        rcfg = RouterConfig.from_dict({**given, **_reconcile("RouterConfig", given, saved, saved.keys())})
        logger.info("resuming from %s (step %d)", found[-1], state["step"])
    elif resume:
        logger.warning("resume=True but %s holds no checkpoint; starting from scratch", output_dir)
    elif found:
        raise ValueError(f"{output_dir} already holds checkpoints ({found[-1].name}); pass resume=True to continue "
                         "that run, or choose another output_dir")

    # processes as launched (torchrun / accelerate launch / MPI), needed to size accumulation before the Accelerator
    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if cfg.global_batch_size % (cfg.micro_batch_size * world):
        raise ValueError(f"global_batch_size={cfg.global_batch_size} must be a multiple of micro_batch_size * "
                         f"num_processes = {cfg.micro_batch_size} * {world}")
    accum = cfg.global_batch_size // (cfg.micro_batch_size * world)  # micro-batches per process per step
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.training_forward == "real")
    # a notebook may train again with another mixed_precision; the launch's process state (PartialState) is kept
    AcceleratorState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=accum, mixed_precision=cfg.mixed_precision,
                              kwargs_handlers=[ddp])
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate runs {accelerator.num_processes}; on CPU "
                           "use `accelerate launch --cpu` or set ACCELERATE_USE_CPU=1 with torchrun")
    device = accelerator.device
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
    if cfg.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use mixed_precision='fp16'")
    set_seed(cfg.seed)
    return _Run(cfg, rcfg, output_dir, found[-1] if state is not None else None, state, accelerator, world, accum)


@dataclass
class _Data:
    """The tokenized conversations and which of them each optimizer step uses.

    Every process tokenizes everything, so a step's global batch is the same rows whatever the number of processes:
    epoch ``e`` is the permutation seeded ``seed + e``, cut into ``steps_per_epoch`` global batches (the remainder is
    dropped). ``end_step``: where this call stops (``stop_after``), ``total_steps``: where the schedule ends.
    """

    rows: list[dict]
    pad: int
    orders: list[torch.Tensor]
    steps_per_epoch: int
    total_steps: int
    end_step: int

    def micro_batches(self, run: _Run, step: int) -> tuple[list[list[dict]], int]:
        """This process's micro-batches of ``step`` (micro-batch j of the global batch goes to process j % world)
        and the number of label tokens in the whole global batch."""
        cfg = run.cfg
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.orders[epoch][k * cfg.global_batch_size : (k + 1) * cfg.global_batch_size].tolist()
        batch = [self.rows[i] for i in order]
        micro = [batch[j : j + cfg.micro_batch_size] for j in range(0, len(batch), cfg.micro_batch_size)]
        return micro[run.accelerator.process_index :: run.world], sum(map(num_labels, batch))


def _data(run: _Run, tokenizer, dataset, stop_after: int | None) -> _Data:
    cfg = run.cfg
    rows = tokenize_conversations(tokenizer, dataset, cfg.max_length)
    steps_per_epoch = len(rows) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(rows)} usable conversations is fewer than global_batch_size={cfg.global_batch_size}")
    if len(rows) % cfg.global_batch_size:
        logger.warning("each epoch drops %d of %d conversations (not a full global batch)",
                       len(rows) % cfg.global_batch_size, len(rows))
    total_steps = steps_per_epoch * cfg.epochs
    orders = [torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + e)) for e in range(cfg.epochs)]
    return _Data(rows, pad_id(tokenizer), orders, steps_per_epoch, total_steps,
                 total_steps if stop_after is None else min(total_steps, stop_after))


@dataclass
class _Trainee:
    """The model under training: ``base`` (the ``*ForCausalLM`` holding the routers), ``prepared`` (the accelerate
    wrapper of ``base`` or its ``PeftModel``), what trains and how, and what ``restore`` puts back."""

    base: nn.Module
    train_model: nn.Module
    prepared: nn.Module
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start_step: int
    layer_ids: list[int]
    flags: dict
    dtypes: dict
    was_training: bool
    own_forward: object  # train_model's instance ``forward`` before accelerate wrapped it (None: the class's)
    capacity_weight: float  # lambda of the next step (``capacity_loss="dual"`` adapts it)

    def restore(self) -> None:
        """Put back ``requires_grad`` flags, dtypes, train/eval mode (new routers keep their default flag) and the
        model's ``forward``, and unmark it as prepared: accelerate's ``prepare`` skips a model it has prepared once,
        so a second bf16 training of the same model ran without autocast."""
        for p in self.base.parameters():
            p.requires_grad_(self.flags.get(p, True))
            p.data = p.data.to(self.dtypes.get(p, p.dtype))
        self.base.train(self.was_training)
        self.train_model.train(self.was_training)
        for mark in ("_original_forward", "_is_accelerate_prepared"):
            self.train_model.__dict__.pop(mark, None)
        if self.own_forward is None:
            self.train_model.__dict__.pop("forward", None)
        else:
            self.train_model.forward = self.own_forward


def _model(run: _Run, model: nn.Module, total_steps: int) -> _Trainee:
    """Routers, frozen backbone, LoRA, float32 trainable parameters, AdamW with warmup + cosine, the checkpoint's
    weights / optimizer / scheduler / RNG on resume, and accelerate's wrapping."""
    cfg = run.cfg
    base = base_model(model)
    _check_router_setup(base, run.rcfg)
    flags = {p: p.requires_grad for p in base.parameters()}
    dtypes = {p: p.dtype for p in base.parameters()}
    was_training = base.training
    for p in base.parameters():
        p.requires_grad_(False)
    train_model = model
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        train_model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    routers = router_parameters(base)
    for p in routers:  # peft froze them; float32 master weights
        p.requires_grad_(cfg.train_routers)
        p.data = p.data.float()
    trainable = [p for p in train_model.parameters() if p.requires_grad]
    expected = {id(p) for p in routers} if cfg.train_routers else set()
    expected |= {id(p) for n, p in train_model.named_parameters() if "lora_" in n}
    if {id(p) for p in trainable} != expected or not trainable:
        raise RuntimeError("trainable parameters are not exactly the routers/LoRA adapters: "
                           f"{[n for n, p in train_model.named_parameters() if p.requires_grad][:10]}")
    backbone_dtype = next(p.dtype for p in base.parameters() if not p.requires_grad)
    if backbone_dtype != torch.float32 and cfg.mixed_precision == "no":
        raise ValueError(f"the backbone is {backbone_dtype}; train it with mixed_precision='bf16' or 'fp16' "
                         "(autocast), the trainable parameters are float32")

    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    start_step = 0 if run.state is None else _restore_checkpoint(run, base, train_model, optimizer, scheduler)
    capacity_weight = run.rcfg.capacity_weight if run.state is None else run.state.get("capacity_weight",
                                                                                         run.rcfg.capacity_weight)
    own_forward = train_model.__dict__.get("forward")  # e.g. accelerate's device-map hook; usually None
    # the scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it per process)
    prepared, optimizer = run.accelerator.prepare(train_model, optimizer)
    layer_ids = [i for i, layer in routed_layers(base).items() if layer.router is not None]
    return _Trainee(base, train_model, prepared, trainable, optimizer, scheduler, start_step, layer_ids, flags, dtypes,
                    was_training, own_forward, capacity_weight)


def _restore_checkpoint(run: _Run, base, train_model, optimizer, scheduler) -> int:
    """Load the resumed checkpoint's routers, adapters, optimizer, scheduler and this process's RNG; its step."""
    load_router_state(base, load_file(str(run.resumed_from / "routers.safetensors")))
    if run.cfg.lora is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(train_model, load_file(str(run.resumed_from / "adapter" / "adapter_model.safetensors")))
    optimizer.load_state_dict(run.state["optimizer"])
    scheduler.load_state_dict(run.state["scheduler"])
    if len(run.state["rng"]) == run.world:
        _set_rng_state(run.state["rng"][run.accelerator.process_index])
    else:
        logger.warning("resume: the checkpoint was written by %d processes, now %d; RNG state not restored",
                       len(run.state["rng"]), run.world)
    return run.state["step"]


def _train_step(run: _Run, data: _Data, t: _Trainee, step: int) -> tuple[dict, float]:
    """One optimizer step over the global batch of ``step`` (module docstring: the loss and its normalisation).

    Returns the log row (losses, capacity overall and per routed layer, over all processes) and the real tokens.
    """
    acc, rcfg, world = run.accelerator, run.rcfg, run.world
    t_step = time.perf_counter()
    lr = t.scheduler.get_last_lr()[0]
    micro_batches, n_labels = data.micro_batches(run, step)
    n_micro = run.cfg.global_batch_size // run.cfg.micro_batch_size
    # summed over this process's micro-batches: CE, capacity penalty, real tokens, executed / total per layer
    stats = torch.zeros(3 + 2 * len(t.layer_ids), dtype=torch.float64)
    for micro in micro_batches:
        batch = {k: v.to(acc.device) for k, v in collate(micro, data.pad).items()}
        with acc.accumulate(t.prepared):
            mode = run.cfg.training_forward
            ctx = RoutingContext(mode, batch["attention_mask"], RoutingTrace(), training_forward=mode)
            out = t.prepared(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             routing_context=ctx, use_cache=False)
            ce = label_ce_sum(out.logits, batch["labels"])
            penalty = capacity_penalty(ctx.trace, rcfg, t.capacity_weight)
            # global-batch normalisation; x world undoes DDP's mean, x accum undoes accelerate's division
            loss = ce / max(n_labels, 1) + penalty / n_micro
            acc.backward(loss * world * run.accum)
            if acc.sync_gradients and run.cfg.max_grad_norm is not None:
                acc.clip_grad_norm_(t.trainable, run.cfg.max_grad_norm)
            t.optimizer.step()
            t.optimizer.zero_grad()
        counts = ctx.trace.counts()
        stats += torch.tensor([ce.item(), penalty.item(), batch["attention_mask"].sum().item(),
                               *[counts[i][0] for i in t.layer_ids], *[counts[i][1] for i in t.layer_ids]],
                              dtype=torch.float64)
    if not t.optimizer.step_was_skipped:  # fp16 overflow skips the step
        t.scheduler.step()
    stats = acc.reduce(stats.to(acc.device), "sum").cpu()
    ce_sum, pen_sum, tokens = stats[:3].tolist()
    executed, total = stats[3 : 3 + len(t.layer_ids)], stats[3 + len(t.layer_ids) :]
    task_loss, capacity_loss = ce_sum / max(n_labels, 1), pen_sum / n_micro
    capacity = float(executed.sum() / total.sum().clamp_min(1))
    row = {"step": step + 1, "epoch": step // data.steps_per_epoch, "loss": task_loss + capacity_loss,
           "task_loss": task_loss, "capacity_loss": capacity_loss, "capacity": capacity,
           "capacity_weight": t.capacity_weight,
           **{f"capacity_L{i}": float(e / n.clamp_min(1)) for i, e, n in zip(t.layer_ids, executed, total)},
           "lr": lr, "tokens_per_s": tokens / max(time.perf_counter() - t_step, 1e-9)}
    if rcfg.capacity_loss == "dual":  # dual ascent on the multiplier (the same value on every process)
        t.capacity_weight += rcfg.capacity_weight_lr * (capacity - rcfg.capacity)
    return row, tokens


def label_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the label tokens (float32 scalar): ``logits`` ``[B, T, V]`` predict
    ``labels`` ``[B, T]`` (unshifted, -100 = not scored) one position later."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def capacity_penalty(trace: RoutingTrace, config: RouterConfig, weight: float | None = None) -> torch.Tensor:
    """The capacity term of one forward's loss (a float32 scalar with the straight-through gradient), per
    ``config.capacity_loss``: ``"hinge"`` ``lambda * ReLU(capacity - target)``, ``"linear"`` ``lambda * sum over
    routed layers of the layer's executed fraction`` or ``"dual"`` ``lambda * (capacity - target)``. ``weight``:
    ``lambda`` (default ``config.capacity_weight``; the trainer passes the dual multiplier's current value)."""
    weight = config.capacity_weight if weight is None else weight
    if config.capacity_loss == "hinge":
        return weight * F.relu(trace.capacity().float() - config.capacity)
    if config.capacity_loss == "dual":
        return weight * (trace.capacity().float() - config.capacity)
    return weight * sum(c.float() for c in trace.layer_capacities().values())


def _save_checkpoint(run: _Run, t: _Trainee, step: int) -> Path:
    """``checkpoints/step-NNNNNN/``: routers, adapters, ``trainer_state.pt`` (step, optimizer, scheduler, every
    process's RNG, the capacity weight lambda, both configs); written to a temporary directory, then renamed."""
    acc = run.accelerator
    rng = gather_object([_rng_state()])
    path = run.output_dir / "checkpoints" / f"step-{step:06d}"
    if acc.is_main_process:
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_routers(t.base, tmp / "routers.safetensors")
        if run.cfg.lora is not None:
            acc.unwrap_model(t.prepared).save_pretrained(tmp / "adapter")
        torch.save({"step": step, "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
                    "rng": rng, "capacity_weight": t.capacity_weight, "train_config": run.cfg.to_dict(),
                    "router_config": asdict(run.rcfg)},
                   tmp / "trainer_state.pt")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    acc.wait_for_everyone()
    return path


@dataclass
class _LoopOutcome:
    history: list[dict]
    tokens: float
    wall_time_s: float
    checkpoint: Path | None  # the last checkpoint written (or resumed from)


def _loop(run: _Run, data: _Data, t: _Trainee) -> _LoopOutcome:
    """Steps ``start_step .. end_step``: a log row per step, a checkpoint every ``save_every`` steps and at the end."""
    acc, cfg = run.accelerator, run.cfg
    if acc.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
    columns = ["step", "epoch", "loss", "task_loss", "capacity_loss", "capacity", "capacity_weight",
               *[f"capacity_L{i}" for i in t.layer_ids], "lr", "tokens_per_s", "elapsed_s"]
    log = _StepLog(run.output_dir, columns, t.start_step, acc.is_main_process)
    logger.info("Router-Tuning: %d steps (%d per epoch), global batch %d = %d processes x %d accumulation x %d; "
                "%d trainable of %d parameters; routed layers %s", data.total_steps, data.steps_per_epoch,
                cfg.global_batch_size, run.world, run.accum, cfg.micro_batch_size,
                sum(p.numel() for p in t.trainable), sum(p.numel() for p in t.train_model.parameters()), t.layer_ids)
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    outcome = _LoopOutcome([], 0.0, 0.0, run.resumed_from)
    bar = tqdm(total=data.total_steps, initial=t.start_step, desc="router-tuning", disable=not acc.is_local_main_process)
    t_start = time.perf_counter()
    t.prepared.train()
    for step in range(t.start_step, data.end_step):
        row, tokens = _train_step(run, data, t, step)
        row["elapsed_s"] = time.perf_counter() - t_start
        outcome.history.append(row)
        outcome.tokens += tokens
        log.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", capacity=f"{row['capacity']:.3f}")
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == data.end_step:
            outcome.checkpoint = _save_checkpoint(run, t, step + 1)
    bar.close()
    outcome.wall_time_s = time.perf_counter() - t_start
    return outcome


def _save_final(run: _Run, t: _Trainee, completed: bool, checkpoint: Path | None) -> tuple[Path, Path | None]:
    """Paths of the routers and adapters the call ends with; a completed run writes them to ``output_dir``, a
    stopped one points at its last checkpoint."""
    final_dir = run.output_dir if completed else checkpoint
    router_path = final_dir / "routers.safetensors"
    adapter_path = final_dir / "adapter" if run.cfg.lora is not None else None
    if completed and run.accelerator.is_main_process:
        save_routers(t.base, router_path)
        if adapter_path is not None:
            run.accelerator.unwrap_model(t.prepared).save_pretrained(adapter_path)
    run.accelerator.wait_for_everyone()
    return router_path, adapter_path


def train_routers(
    model: nn.Module,
    tokenizer,
    dataset,
    router_config: RouterConfig,
    train_config: TrainConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Router-Tuning of ``model`` (a ``*ForCausalLM``) on ``dataset`` (conversations ``{"messages": [...]}``).

    Attaches routers per ``router_config`` if the model has none. Every backbone parameter is frozen; only routers
    (``train_config.train_routers``) and LoRA adapters (``train_config.lora``) are trained, in float32. Routed layers
    make hard 0/1 decisions with a straight-through gradient and run per ``train_config.training_forward``: ``masked``
    gives every trainable parameter a gradient on every step; with ``real`` a LoRA adapter of a sub-layer that a whole
    micro-batch skips gets none, so DDP then runs with ``find_unused_parameters``.

    resume: continue from the last checkpoint in ``output_dir`` (same final routers as an uninterrupted run);
        trajectory-defining settings that differ from the checkpoint's are warned about and the checkpoint's kept.
        Without it, an ``output_dir`` that already holds checkpoints is an error.
    stop_after: end this call once this many optimizer steps are done in total (a checkpoint is saved); the learning
        rate schedule still spans the whole run.

    The model's ``requires_grad`` flags, train/eval mode and parameter dtypes are restored on return (trained
    weights stay in place); with LoRA the returned ``TrainResult.model`` is the ``PeftModel``.
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 or None, got {stop_after!r}")
    run = _setup(train_config, router_config, resume)
    data = _data(run, tokenizer, dataset, stop_after)
    trainee = _model(run, model, data.total_steps)
    try:
        outcome = _loop(run, data, trainee)
        completed = data.end_step == data.total_steps
        router_path, adapter_path = _save_final(run, trainee, completed, outcome.checkpoint)
    finally:
        trainee.restore()
    return _result(run, trainee, outcome, completed, data.end_step, router_path, adapter_path)


def _result(run: _Run, t: _Trainee, outcome: _LoopOutcome, completed: bool, steps: int, router_path: Path,
            adapter_path: Path | None) -> TrainResult:
    device = run.accelerator.device
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    last = outcome.history[-1] if outcome.history else {}
    logger.info("Router-Tuning %s at step %d in %.1f s; capacity %s; routers: %s",
                "done" if completed else "stopped", steps, outcome.wall_time_s, last.get("capacity"), router_path)
    return TrainResult(
        model=run.accelerator.unwrap_model(t.prepared), completed=completed, steps=steps,  # forward: restore()'s
        router_path=router_path, adapter_path=adapter_path, log_path=run.output_dir / "train_log.jsonl",
        wall_time_s=outcome.wall_time_s, tokens_per_s=outcome.tokens / max(outcome.wall_time_s, 1e-9),
        peak_memory_bytes=int(peak), trainable_parameters=sum(p.numel() for p in t.trainable),
        total_parameters=sum(p.numel() for p in t.train_model.parameters()), final_capacity=last.get("capacity"),
        final_loss=last.get("loss"), history=outcome.history,
    )


__all__ = ["LoraSettings", "TrainConfig", "TrainResult", "calibrate_thresholds", "capacity_penalty", "threshold_for",
           "train_routers"]
