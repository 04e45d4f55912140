"""Router-Tuning's training settings (``TrainConfig``, ``LoraSettings``) and what a run returns (``TrainResult``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from torch import nn

from .routing import MODES

MIXED_PRECISION = ("no", "bf16", "fp16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    training_forward: how routed layers execute in training (``routing.RoutingContext.training_forward``):
        ``"masked"`` (default): every input runs the gated sub-layer and its output is multiplied by the hard 0/1
        straight-through decision, so skipped inputs also pass task-loss gradient to the router;
        ``"real"`` (the released 2024 code): only kept inputs run it, their output multiplied by the straight-through
        decision (value 1); skipped inputs get no task-loss gradient. Inference is unaffected.
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
    training_forward: str = "masked"

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
            (self.training_forward in MODES, f"training_forward must be one of {MODES} ('masked': every input "
             "computed, 'real': kept inputs only)"),
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
