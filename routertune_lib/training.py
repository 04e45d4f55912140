"""Router-Tuning: train the routers (and optionally LoRA adapters) of a frozen decoder on chat data.

One explicit loop, ``train_routers``, built on ``accelerate.Accelerator`` so the same code runs on CPU, one GPU or
many (``accelerate launch`` / ``torchrun``: DDP, or FSDP/DeepSpeed from the user's accelerate config). Per optimizer
step it computes, over the global batch of ``global_batch_size`` conversations,

    L = CE(assistant tokens) / #assistant tokens                      (token mean over the whole global batch)
      + capacity_weight * mean_over_micro_batches ReLU(capacity_m - capacity)

where ``capacity_m`` is the executed fraction over routed layers of micro-batch ``m`` (``RoutingTrace.capacity``,
carrying the straight-through gradient). Both terms are normalised over the global batch, not per micro-batch or per
process, so the gradient does not depend on ``micro_batch_size`` or on the number of processes (up to float error).

``calibrate_thresholds`` then sets per-layer thresholds so a trained router hits any requested capacity.
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, get_int_from_env, set_seed
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .reporting import write_atomic
from .routing import (
    RouterConfig,
    RoutingContext,
    RoutingTrace,
    attach_routers,
    router_parameters,
    routed_layers,
    save_routers,
    set_thresholds,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MIXED_PRECISION = ("no", "bf16", "fp16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# TrainConfig fields that define the training trajectory: on resume the checkpoint's values win (with a warning).
_TRAJECTORY_FIELDS = (
    "learning_rate", "weight_decay", "adam_betas", "adam_eps", "warmup_ratio", "epochs", "global_batch_size",
    "max_length", "max_grad_norm", "seed", "lora", "train_routers",
)


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def _from_dict(cls, d: dict):
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} keys {unknown}; valid keys: {known}")
    return cls(**d)


@dataclass
class LoraSettings:
    """LoRA adapters trained with (or instead of) the routers (paper Table 8; its LoRA hyper-parameters are not
    reported, these are peft's usual ones).

    r: rank >= 1. alpha: scaling numerator > 0 (scale = alpha / r). dropout: in [0, 1).
    target_modules: module-name suffixes to adapt; the default covers Llama, Mistral, Qwen2 and Gemma3.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraSettings.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraSettings.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"LoraSettings.target_modules must be non-empty module names, got {self.target_modules!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        return _from_dict(cls, d)


@dataclass
class TrainConfig:
    """Router-Tuning hyper-parameters; defaults are the paper's released script (Alpaca, 1 epoch, bf16 on GPU).

    learning_rate: AdamW peak lr > 0 (paper grid 1e-5, 2e-5, 5e-5, 1e-4, 2e-4; released script 1e-5).
    weight_decay: >= 0. adam_betas: each in [0, 1). adam_eps: > 0 (HF Trainer defaults).
    warmup_ratio: fraction of steps of linear warmup before the cosine decay to 0, in [0, 1)
        (warmup steps = ceil(ratio * total steps), as in HF Trainer).
    epochs: passes over the data, >= 1; each epoch is a fresh permutation from ``seed``; the last
        ``len(data) % global_batch_size`` rows of each permutation are dropped (a full global batch per step).
    global_batch_size: conversations per optimizer step, >= 1; must be a multiple of
        ``micro_batch_size * num_processes`` (gradient accumulation makes up the rest).
    micro_batch_size: conversations per forward on one process, >= 1 (memory only; the result does not depend on it).
    max_length: tokens per conversation after the chat template, >= 2 (longer ones are truncated on the right).
    max_grad_norm: clip the global gradient norm to this (> 0), or ``None`` for no clipping.
    seed: data order, LoRA initialisation and dropout.
    output_dir: logs, checkpoints and the final routers (``routers.safetensors``) / adapters (``adapter/``).
    save_every: save a checkpoint every this many optimizer steps (>= 1), or ``None`` for only at the end.
    mixed_precision: ``no``, ``bf16`` (CPU, or a GPU that supports it) or ``fp16`` (GPU only). Trainable parameters
        are kept in float32 either way; a bf16/fp16 backbone needs autocast, i.e. ``bf16`` or ``fp16`` here.
    lora: LoRA adapters to train, or ``None``.
    train_routers: train the routers; ``False`` with ``lora`` set trains LoRA alone (routers frozen as they are).
    """

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    epochs: int = 1
    global_batch_size: int = 64
    micro_batch_size: int = 4
    max_length: int = 2048
    max_grad_norm: float | None = 1.0
    seed: int = 0
    output_dir: str = "outputs/router-tuning"
    save_every: int | None = None
    mixed_precision: str = "no"
    lora: LoraSettings | None = None
    train_routers: bool = True

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraSettings.from_dict(self.lora)
        self.adam_betas = tuple(self.adam_betas)
        self.output_dir = str(self.output_dir)
        checks = [
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas must be 2 values in [0, 1)"),
            (self.adam_eps > 0, "adam_eps must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (isinstance(self.global_batch_size, int) and self.global_batch_size >= 1, "global_batch_size must be an integer >= 1"),
            (isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1, "micro_batch_size must be an integer >= 1"),
            (self.global_batch_size % self.micro_batch_size == 0, "global_batch_size must be a multiple of micro_batch_size"),
            (isinstance(self.max_length, int) and self.max_length >= 2, "max_length must be an integer >= 2"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None"),
            (isinstance(self.seed, int), "seed must be an integer"),
            (self.save_every is None or (isinstance(self.save_every, int) and self.save_every >= 1), "save_every must be an integer >= 1 or None"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}"),
            (self.lora is None or isinstance(self.lora, LoraSettings), "lora must be a LoraSettings, a dict or None"),
            (self.train_routers or self.lora is not None, "nothing to train: train_routers=False needs lora settings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{message}; got {self}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a plain dict (e.g. parsed YAML/JSON); unknown keys raise, listing the valid ones."""
        return _from_dict(cls, d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What one ``train_routers`` call did.

    model: the trained model (a ``peft.PeftModel`` wrapping the input model when LoRA is used, else the input model).
    completed: False when ``stop_after`` ended the run early (resume it with ``resume=True``).
    router_path: final routers (``output_dir/routers.safetensors``), or the last checkpoint's when stopped early.
    adapter_path: the LoRA adapter directory (peft ``save_pretrained``, adapters only), or ``None``.
    log_path: per-step JSON-lines log (a CSV with the same columns sits next to it).
    tokens_per_s: real (non-padding) tokens processed per second over all processes.
    peak_memory_bytes: CUDA max allocated on GPU; the process's peak RSS on CPU.
    final_capacity: executed fraction over routed layers in the last step's global batch (training decisions).
    history: the rows logged by this call.
    """

    model: nn.Module
    completed: bool
    steps: int
    router_path: Path
    adapter_path: Path | None
    log_path: Path
    wall_time_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    trainable_parameters: int
    total_parameters: int
    final_capacity: float | None
    final_loss: float | None
    history: list[dict] = field(default_factory=list, repr=False)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of its assistant turns.

    A turn's span runs from the end of the prefix rendered with ``add_generation_prompt=True`` (what the model sees
    before it answers) to the end of the rendering that includes the turn (so the end-of-turn marker is learned).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError(
                "The tokenizer's chat template is not prefix-consistent (rendering the first turns, with the "
                "generation prompt, is not a prefix of rendering the whole conversation), so assistant tokens "
                f"cannot be located. Conversation: {messages!r:.300}"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def tokenize_conversations(tokenizer, conversations, max_length: int) -> list[dict]:
    """Chat-template tokenization with assistant-only labels.

    conversations: iterable of ``{"messages": [{"role", "content"}, ...]}``.
    Returns ``[{"input_ids": list[int], "labels": list[int]}]``, truncated on the right to ``max_length``; a label is
    the token id for tokens whose first character lies in an assistant span, else -100 (HF convention: labels are
    not shifted). Rows left with no assistant token (e.g. after truncation) are dropped, counted and logged.
    Needs a fast tokenizer (character offsets) with a chat template.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_conversations needs a fast tokenizer (PreTrainedTokenizerFast) for offsets")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template")
    rows, dropped = [], 0
    for n, conv in enumerate(conversations):
        if not (isinstance(conv, dict) and isinstance(conv.get("messages"), list)):
            raise ValueError(f"row {n} is not a conversation {{'messages': [{{'role', 'content'}}, ...]}}: "
                             f"{conv!r:.120}; load Alpaca rows, JSON files and hub datasets with "
                             "routertune_lib.data.load_instruction_data, which converts them")
        text, spans = _assistant_spans(tokenizer, conv["messages"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:max_length]
        labels = [
            tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
            for tok, (start, _end) in zip(ids, enc["offset_mapping"])
        ]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if dropped:
        logger.warning(
            "dropped %d of %d conversations with no assistant token within max_length=%d",
            dropped, len(rows) + dropped, max_length,
        )
    return rows


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return pad


def _collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to ``{input_ids, attention_mask, labels}``, each ``[B, T]``."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _num_labels(row: dict) -> int:
    return sum(label != IGNORE_INDEX for label in row["labels"][1:])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and logs


def _base_model(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside DDP / peft wrappers (where the routers live)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
# Training


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
    (``train_config.train_routers``) and LoRA adapters (``train_config.lora``) are trained, in float32. Training runs
    routed layers in masked mode (hard 0/1 decisions, straight-through gradient), so every trainable parameter gets a
    gradient on every step (DDP needs no ``find_unused_parameters``).

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
    cfg, rcfg = train_config, router_config
    output_dir = Path(cfg.output_dir)
    found = _checkpoints(output_dir)
    state = None
    if resume and found:
        state = torch.load(found[-1] / "trainer_state.pt", map_location="cpu", weights_only=False)
        given = cfg.to_dict()
        changed = _reconcile("TrainConfig", given, state["train_config"], _TRAJECTORY_FIELDS)
        cfg = TrainConfig.from_dict({**given, **changed})
        changed = _reconcile("RouterConfig", asdict(rcfg), state["router_config"], state["router_config"].keys())
        rcfg = RouterConfig.from_dict({**asdict(rcfg), **changed})
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
    # a notebook may train again with another mixed_precision; the launch's process state (PartialState) is kept
    AcceleratorState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=accum, mixed_precision=cfg.mixed_precision)
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate runs {accelerator.num_processes}; on CPU "
                           "use `accelerate launch --cpu` or set ACCELERATE_USE_CPU=1 with torchrun")
    device = accelerator.device
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
    if cfg.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use mixed_precision='fp16'")
    set_seed(cfg.seed)

    # -- data: every process tokenizes everything; a step's global batch is the same rows whatever `world` is
    rows = tokenize_conversations(tokenizer, dataset, cfg.max_length)
    pad_id = _pad_id(tokenizer)
    steps_per_epoch = len(rows) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(rows)} usable conversations is fewer than global_batch_size={cfg.global_batch_size}")
    if len(rows) % cfg.global_batch_size:
        logger.warning("each epoch drops %d of %d conversations (not a full global batch)",
                       len(rows) % cfg.global_batch_size, len(rows))
    total_steps = steps_per_epoch * cfg.epochs
    end_step = total_steps if stop_after is None else min(total_steps, stop_after)
    orders = [torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + e)) for e in range(cfg.epochs)]

    def my_micro_batches(step: int) -> tuple[list[list[dict]], int]:
        """This process's micro-batches of ``step`` (micro-batch j of the global batch goes to process j % world)
        and the number of label tokens in the whole global batch."""
        epoch, k = divmod(step, steps_per_epoch)
        batch = [rows[i] for i in orders[epoch][k * cfg.global_batch_size : (k + 1) * cfg.global_batch_size].tolist()]
        micro = [batch[j : j + cfg.micro_batch_size] for j in range(0, len(batch), cfg.micro_batch_size)]
        return micro[accelerator.process_index :: world], sum(map(_num_labels, batch))

    # -- model: routers, freezing, LoRA
    base = _base_model(model)
    _check_router_setup(base, rcfg)
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
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in train_model.parameters())

    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    start_step = 0
    if state is not None:
        weights = load_file(str(found[-1] / "routers.safetensors"))
        for i, layer in routed_layers(base).items():
            if layer.router is not None:
                layer.router.weight.data.copy_(weights[f"layers.{i}.router.weight"])
        if cfg.lora is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(train_model, load_file(str(found[-1] / "adapter" / "adapter_model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][accelerator.process_index])
        else:
            logger.warning("resume: the checkpoint was written by %d processes, now %d; RNG state not restored",
                           len(state["rng"]), world)
    # the scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it per process)
    prepared, optimizer = accelerator.prepare(train_model, optimizer)
    layer_ids = [i for i, layer in routed_layers(base).items() if layer.router is not None]
    columns = ["step", "epoch", "loss", "task_loss", "capacity_loss", "capacity",
               *[f"capacity_L{i}" for i in layer_ids], "lr", "tokens_per_s", "elapsed_s"]
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    log = _StepLog(output_dir, columns, start_step, accelerator.is_main_process)
    logger.info("Router-Tuning: %d steps (%d per epoch), global batch %d = %d processes x %d accumulation x %d; "
                "%d trainable of %d parameters; routed layers %s", total_steps, steps_per_epoch, cfg.global_batch_size,
                world, accum, cfg.micro_batch_size, n_trainable, n_total, layer_ids)

    def save_checkpoint(step: int) -> Path:
        """``checkpoints/step-NNNNNN/``: routers, adapters, trainer_state.pt; written to a temp dir, then renamed."""
        rng = gather_object([_rng_state()])
        path = output_dir / "checkpoints" / f"step-{step:06d}"
        if accelerator.is_main_process:
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_routers(base, tmp / "routers.safetensors")
            if cfg.lora is not None:
                accelerator.unwrap_model(prepared).save_pretrained(tmp / "adapter")
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng, "train_config": cfg.to_dict(), "router_config": asdict(rcfg)},
                       tmp / "trainer_state.pt")
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        accelerator.wait_for_everyone()
        return path

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history, tokens_total, checkpoint = [], 0, found[-1] if state is not None else None
    n_micro = cfg.global_batch_size // cfg.micro_batch_size
    bar = tqdm(total=total_steps, initial=start_step, desc="router-tuning", disable=not accelerator.is_local_main_process)
    t_start = time.perf_counter()
    try:
        prepared.train()
        for step in range(start_step, end_step):
            t_step = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            micro_batches, n_labels = my_micro_batches(step)
            # summed over this process's micro-batches: CE, capacity penalty, real tokens, executed / total per layer
            stats = torch.zeros(3 + 2 * len(layer_ids), dtype=torch.float64)
            for micro in micro_batches:
                batch = {k: v.to(accelerator.device) for k, v in _collate(micro, pad_id).items()}
                with accelerator.accumulate(prepared):
                    ctx = RoutingContext("masked", batch["attention_mask"], RoutingTrace())
                    out = prepared(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   routing_context=ctx, use_cache=False)
                    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                         ignore_index=IGNORE_INDEX, reduction="sum")
                    penalty = rcfg.capacity_weight * F.relu(ctx.trace.capacity().float() - rcfg.capacity)
                    # global-batch normalisation; x world undoes DDP's mean, x accum undoes accelerate's division
                    loss = ce / max(n_labels, 1) + penalty / n_micro
                    accelerator.backward(loss * world * accum)
                    if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                counts = ctx.trace.counts()
                stats += torch.tensor([ce.item(), penalty.item(), batch["attention_mask"].sum().item(),
                                       *[counts[i][0] for i in layer_ids], *[counts[i][1] for i in layer_ids]],
                                      dtype=torch.float64)
            if not optimizer.step_was_skipped:  # fp16 overflow skips the step
                scheduler.step()
            stats = accelerator.reduce(stats.to(accelerator.device), "sum").cpu()
            ce_sum, pen_sum, tokens = stats[:3].tolist()
            executed, total = stats[3 : 3 + len(layer_ids)], stats[3 + len(layer_ids) :]
            tokens_total += tokens
            task_loss, capacity_loss = ce_sum / max(n_labels, 1), pen_sum / n_micro
            row = {"step": step + 1, "epoch": step // steps_per_epoch, "loss": task_loss + capacity_loss,
                   "task_loss": task_loss, "capacity_loss": capacity_loss,
                   "capacity": float(executed.sum() / total.sum().clamp_min(1)),
                   **{f"capacity_L{i}": float(e / t.clamp_min(1)) for i, e, t in zip(layer_ids, executed, total)},
                   "lr": lr, "tokens_per_s": tokens / max(time.perf_counter() - t_step, 1e-9),
                   "elapsed_s": time.perf_counter() - t_start}
            history.append(row)
            log.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", capacity=f"{row['capacity']:.3f}")
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == end_step:
                checkpoint = save_checkpoint(step + 1)
        bar.close()
        wall = time.perf_counter() - t_start
        completed = end_step == total_steps
        final_dir = output_dir if completed else checkpoint
        router_path = final_dir / "routers.safetensors"
        adapter_path = final_dir / "adapter" if cfg.lora is not None else None
        if completed and accelerator.is_main_process:
            save_routers(base, router_path)
            if adapter_path is not None:
                accelerator.unwrap_model(prepared).save_pretrained(adapter_path)
        accelerator.wait_for_everyone()
    finally:
        for p in base.parameters():  # restore flags, dtypes and mode; new routers keep their default flag
            p.requires_grad_(flags.get(p, True))
            p.data = p.data.to(dtypes.get(p, p.dtype))
        base.train(was_training)
        train_model.train(was_training)
    final_model = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    last = history[-1] if history else {}
    logger.info("Router-Tuning %s at step %d in %.1f s; capacity %s; routers: %s",
                "done" if completed else "stopped", end_step, wall, last.get("capacity"), router_path)
    return TrainResult(
        model=final_model, completed=completed, steps=end_step, router_path=router_path, adapter_path=adapter_path,
        log_path=log.jsonl, wall_time_s=wall, tokens_per_s=tokens_total / max(wall, 1e-9),
        peak_memory_bytes=int(peak), trainable_parameters=n_trainable, total_parameters=n_total,
        final_capacity=last.get("capacity"), final_loss=last.get("loss"), history=history,
    )


# ----------------------------------------------------------------------------------------------------------------
# Threshold calibration


def _calibration_batches(data, tokenizer, batch_size: int, max_length: int, device) -> list[dict]:
    """Right-padded ``{input_ids, attention_mask}`` batches from conversations (chat template), plain texts (the
    tokenizer's default specials, e.g. BOS, as an evaluation encodes a context) or ready batches."""
    items = list(data)
    is_text = bool(items) and all(isinstance(x, str) for x in items)
    if is_text or (items and isinstance(items[0], dict) and "messages" in items[0]):
        if tokenizer is None:
            raise ValueError("calibrating on conversations or texts needs a tokenizer")
        if is_text:
            encoded = tokenizer(items)["input_ids"]
            empty = [i for i, ids in enumerate(encoded) if not ids]
            if empty:
                raise ValueError(f"calibration texts {empty[:5]} have no tokens (e.g. {items[empty[0]]!r}); "
                                 "leave out empty texts")
            rows = [{"input_ids": ids[:max_length], "labels": ids[:max_length]} for ids in encoded]
        else:
            rows = tokenize_conversations(tokenizer, items, max_length)
        pad_id = _pad_id(tokenizer)
        items = [_collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
    batches = []
    for b in items:
        if not (isinstance(b, dict) and "input_ids" in b):
            raise ValueError("calibration data must be conversations, texts or batches "
                             "{'input_ids': [B, T], 'attention_mask'?}")
        ids = torch.as_tensor(b["input_ids"]).to(device)
        mask = b.get("attention_mask")
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else torch.as_tensor(mask).to(device)})
    if not batches:
        raise ValueError("no calibration data")
    return batches


@torch.no_grad()
def _router_scores(model: nn.Module, mode: str, batches: list[dict]) -> dict[int, torch.Tensor]:
    """``{layer: 1-D router probabilities}`` over all sequences (sequence level) or real tokens (token level)."""
    scores: dict[int, list[torch.Tensor]] = {}
    for b in batches:
        ctx = RoutingContext(mode, b["attention_mask"], RoutingTrace())
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], routing_context=ctx, use_cache=False)
        for d in ctx.trace.decisions:
            if d.score is not None:
                scores.setdefault(d.layer, []).append(d.score[d.weight > 0].float().cpu())
    return {i: torch.cat(s) for i, s in scores.items()}


def _threshold_for(scores: torch.Tensor, capacity: float) -> float:
    """Midway between the ``k``-th and ``(k+1)``-th largest score, ``k = round(capacity * n)`` (at least 1):
    ``score >= t`` then holds for exactly ``k`` of these scores when there are no ties, and float noise of a
    re-run (another batch size) cannot flip the boundary input."""
    s = scores.sort(descending=True).values
    k = min(len(s), max(1, int(capacity * len(s) + 0.5)))
    return float(s[k - 1] if k == len(s) else (s[k - 1] + s[k]) / 2)


def calibrate_thresholds(
    model: nn.Module,
    data,
    capacity: float,
    per_layer: bool = True,
    *,
    tokenizer=None,
    batch_size: int = 8,
    max_length: int = 2048,
    rounds: int = 3,
) -> dict[int, float]:
    """Set router thresholds so the executed fraction on ``data`` equals ``capacity``; returns ``{layer: threshold}``.

    data: conversations or plain texts (with ``tokenizer``; batched by ``batch_size``; e.g.
        ``evaluation.task_prompts`` to calibrate on the kind of text an evaluation routes) or batches
        ``{"input_ids": [B, T], "attention_mask": [B, T]}``. Scores are counted per sequence (sequence level) or per real token (token level).
    per_layer=True: layers are calibrated in order, each on a forward where the layers before it already use their new
        thresholds, so every routed layer executes exactly ``round(capacity * n)`` of its ``n`` inputs on ``data``
        (barring tied scores). One forward pass over ``data`` per routed layer.
    per_layer=False: one threshold for all layers, the pooled quantile of all layers' scores, re-estimated for
        ``rounds`` passes (skipping upstream changes downstream scores); the executed fraction over all routed
        layers is then close to, not exactly, ``capacity``, and individual layers differ.
    Runs without gradients, in the model's routing mode; a threshold is a score, so it lies in [0, 1].
    """
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must be in (0, 1], got {capacity!r}")
    base = _base_model(model)
    batches = _calibration_batches(data, tokenizer, batch_size, max_length, next(base.parameters()).device)
    mode = base.routertune.mode
    layers = [i for i, layer in routed_layers(base).items() if layer.router is not None]
    was_training = model.training
    model.eval()
    try:
        if per_layer:
            thresholds = {}
            for i in layers:
                thresholds[i] = _threshold_for(_router_scores(model, mode, batches)[i], capacity)
                set_thresholds(base, {i: thresholds[i]})
        else:
            for _ in range(rounds):
                t = _threshold_for(torch.cat(list(_router_scores(model, mode, batches).values())), capacity)
                thresholds = {i: t for i in layers}
                set_thresholds(base, thresholds)
    finally:
        model.train(was_training)
    logger.info("calibrated thresholds for capacity %.3f: %s", capacity, thresholds)
    return thresholds
