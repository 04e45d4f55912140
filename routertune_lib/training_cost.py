"""Training cost (the paper's Table 4 claim): Router-Tuning vs LoRA vs full fine-tuning on the same data and steps.

:func:`training_cost` runs each method in its own Python process (``python -m routertune_lib.training_cost``), so the
peak memory it reports is that method's alone (process peak RSS on CPU; CUDA max allocated on a GPU), and returns one
row per method. Every method sees the same conversations, order, global batch, micro-batch and maximum length:

* ``routers``: Router-Tuning (:func:`routertune_lib.training.train_routers`; attention routers at sequence level,
  backbone frozen); afterwards the thresholds are calibrated to the target capacity on held-out conversations and
  the executed fraction is measured there and on a second held-out set.
* ``lora``: LoRA adapters alone through the same trainer (``LoraSettings()``, routers frozen at zero = dense).
* ``full``: every parameter with AdamW, plain loop, the same batches and loss normalisation.

Router-Tuning runs every step of one epoch; LoRA and full fine-tuning run ``steps_other`` steps (0 = all) and their
epoch time is extrapolated from the measured time per step (``epoch_time`` says which).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import torch

METHODS = ("routers", "lora", "full")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CostConfig:
    """One training-cost comparison (defaults: ``benchmarks/training_cost.py``, SmolLM2-135M on CPU).

    model: a ``load_model`` name, or ``None`` for ``tiny_random_model()`` (smoke runs).
    samples: training conversations (the first ``samples`` of ``load_instruction_data(data_source, seed=seed)``);
        an epoch is ``samples // global_batch`` optimizer steps. held_out: conversations in each of the two held-out
        sets that follow them (threshold calibration, then a fresh measurement of the executed fraction).
    num_layers: routed layers (the deepest except the last); ``None`` = half the layers.
    lr / lr_lora / lr_full: AdamW learning rate of Router-Tuning / LoRA / full fine-tuning.
    steps_other: optimizer steps timed for LoRA and full fine-tuning (0 = the whole epoch, like Router-Tuning).
    mixed_precision: ``no`` / ``bf16`` / ``fp16`` for the router and LoRA trainer (full fine-tuning trains the weights
        in the dtype ``load_model`` gives: float32 on CPU, bf16 on GPU).
    """

    model: str | None = "smollm2-135m"
    samples: int = 1000
    held_out: int = 64
    max_length: int = 256
    global_batch: int = 64
    micro_batch: int = 8
    num_layers: int | None = 15
    capacity: float = 0.5
    capacity_weight: float = 0.1
    lr: float = 1e-3
    lr_lora: float = 2e-4
    lr_full: float = 1e-5
    steps_other: int = 3
    seed: int = 0
    mixed_precision: str = "no"
    data_source: str = "offline-mix"

    def __post_init__(self):
        if self.samples < self.global_batch:
            raise ValueError(f"CostConfig: samples={self.samples} is fewer than one global batch "
                             f"({self.global_batch}); raise samples or lower global_batch")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"CostConfig: global_batch={self.global_batch} must be a multiple of "
                             f"micro_batch={self.micro_batch}")
        if self.held_out < 1 or self.steps_other < 0:
            raise ValueError(f"CostConfig: held_out must be >= 1 and steps_other >= 0, got {self.held_out}, "
                             f"{self.steps_other}")

    @property
    def steps_total(self) -> int:
        return self.samples // self.global_batch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"CostConfig: unknown keys {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        return cls(**d)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated on a GPU, else the process's peak RSS (Linux reports KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def run_method(config: CostConfig, method: str) -> dict:
    """Train with ``method`` (one of :data:`METHODS`) in this process; returns its measurements.

    Keys: method, steps_total, steps_run, wall_s (training loop only), tokens_per_s (real tokens), trainable, total
    (parameters), peak_memory_bytes + peak_memory_kind, peak_rss_bytes (process peak RSS, whatever the device),
    final_loss; for ``routers`` also capacity_trained / capacity_calibrated / capacity_held_out and layers.
    Run it in a fresh process (:func:`measure_method`) for a peak memory of this method alone.
    """
    from .data import load_instruction_data
    from .experiments import executed_fractions, load_base_model
    from .routing import RouterConfig, routed_layers
    from .training import LoraSettings, TrainConfig, calibrate_thresholds, train_routers

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {METHODS}")
    c = config
    torch.manual_seed(c.seed)
    model, tokenizer = load_base_model(c.model)
    data = load_instruction_data(c.data_source, limit=c.samples + 2 * c.held_out, seed=c.seed)
    train, calib, test = data[: c.samples], data[c.samples : c.samples + c.held_out], data[c.samples + c.held_out :]
    steps = c.steps_total
    limit = steps if method == "routers" or c.steps_other == 0 else min(c.steps_other, steps)
    out = {"method": method, "steps_total": steps, "steps_run": limit}
    if method == "full":
        out.update(full_finetune(model, tokenizer, train, c, limit))
    else:
        router_config = RouterConfig(target="attn", level="sequence", num_layers=c.num_layers, capacity=c.capacity,
                                     capacity_weight=c.capacity_weight)
        cfg = TrainConfig(learning_rate=c.lr if method == "routers" else c.lr_lora, global_batch_size=c.global_batch,
                          micro_batch_size=c.micro_batch, max_length=c.max_length, seed=c.seed,
                          mixed_precision=c.mixed_precision, output_dir=tempfile.mkdtemp(prefix="training-cost-"),
                          lora=LoraSettings() if method == "lora" else None, train_routers=method == "routers")
        result = train_routers(model, tokenizer, train, router_config, cfg, stop_after=limit)
        device = next(model.parameters()).device
        peak, kind = result.peak_memory_bytes, _peak_memory(device)[1]
        out.update(wall_s=result.wall_time_s, tokens_per_s=result.tokens_per_s, peak_memory_bytes=peak,
                   peak_memory_kind=kind, trainable=result.trainable_parameters, total=result.total_parameters,
                   final_loss=result.final_loss)
        if method == "routers":
            out["capacity_trained"] = result.final_capacity
            calibrate_thresholds(model, calib, c.capacity, tokenizer=tokenizer, max_length=c.max_length)
            for name, convs in (("capacity_calibrated", calib), ("capacity_held_out", test)):
                out[name] = executed_fractions(model, convs, tokenizer, c.max_length)["overall"]
            out["layers"] = list(routed_layers(model))
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def full_finetune(model, tokenizer, train, config: CostConfig, limit: int) -> dict:
    """Full fine-tuning (every parameter, AdamW, no clipping) for ``limit`` steps on the batches Router-Tuning sees:
    a seeded permutation of the tokenized conversations, ``global_batch`` rows per step in ``micro_batch`` chunks,
    loss = summed assistant-token cross-entropy / the step's label count. Returns wall_s, tokens_per_s, trainable,
    total, peak_memory_bytes, peak_memory_kind, final_loss (the last step's loss)."""
    from .batching import collate, pad_id, tokenize_conversations

    c = config
    device = next(model.parameters()).device
    rows = tokenize_conversations(tokenizer, train, c.max_length)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(c.seed)).tolist()
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr_full, weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens, loss_sum, start = 0, 0.0, time.perf_counter()
    for step in range(limit):
        batch = [rows[i] for i in order[step * c.global_batch : (step + 1) * c.global_batch]]
        n_labels = sum(sum(t != -100 for t in r["labels"][1:]) for r in batch)
        loss_sum = 0.0
        for j in range(0, len(batch), c.micro_batch):
            mb = {k: v.to(device) for k, v in collate(batch[j : j + c.micro_batch], pad_id(tokenizer)).items()}
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(),
                                                     ignore_index=-100, reduction="sum") / max(n_labels, 1)
            loss.backward()
            loss_sum += float(loss)
            tokens += int(mb["attention_mask"].sum())
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    n = sum(p.numel() for p in model.parameters())
    peak, kind = _peak_memory(device)
    return dict(wall_s=wall, tokens_per_s=tokens / max(wall, 1e-9), trainable=n, total=n, peak_memory_bytes=peak,
                peak_memory_kind=kind, final_loss=loss_sum if limit else None)


def measure_method(config: CostConfig, method: str) -> dict:
    """:func:`run_method` in a fresh Python process (its own peak memory); raises ``RuntimeError`` with the end of the
    child's stderr if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "routertune_lib.training_cost", "--method", method,
           "--config", json.dumps(config.to_dict())]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"training cost of {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result[-1][len("RESULT "):])


def cost_table(rows: list[dict]) -> pd.DataFrame:
    """One row per method from :func:`run_method` results, plus derived columns: wall_s_per_step, wall_s_epoch (per
    step x steps_total), epoch_time (``measured`` or ``extrapolated``), time_vs_routers (epoch time / Router-Tuning's;
    NaN without a routers row), trainable_pct, peak_memory_gib, peak_rss_gib."""
    df = pd.DataFrame(rows)
    df["wall_s_per_step"] = df.wall_s / df.steps_run
    df["wall_s_epoch"] = df.wall_s_per_step * df.steps_total
    df["epoch_time"] = ["measured" if r.steps_run == r.steps_total else "extrapolated" for r in df.itertuples()]
    rt = df[df.method == "routers"]
    df["time_vs_routers"] = df.wall_s_epoch / rt.wall_s_epoch.iloc[0] if len(rt) else float("nan")
    df["trainable_pct"] = 100 * df.trainable / df.total
    if "peak_memory_bytes" not in df:  # rows written before the device-aware field: CPU runs, peak RSS
        df["peak_memory_bytes"], df["peak_memory_kind"] = df.peak_rss_bytes, "process_peak_rss"
    df["peak_memory_gib"] = df.peak_memory_bytes / 2**30
    df["peak_rss_gib"] = df.peak_rss_bytes / 2**30
    return df


def measure_methods(config: CostConfig, methods=METHODS) -> list[dict]:
    """:func:`measure_method` for each of ``methods``, in this order (one fresh process each)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown or no methods {list(methods)}; valid methods: {METHODS}")
    return [measure_method(config, m) for m in methods]


def training_cost(config: CostConfig, methods=METHODS) -> pd.DataFrame:
    """Measure each of ``methods`` with ``config``, one fresh process per method; one row per method, columns as
    :func:`cost_table`."""
    return cost_table(measure_methods(config, methods))


def committed_benchmark(model: str = "smollm2-135m") -> dict | None:
    """The committed ``benchmarks/training_cost.py`` run for ``model`` (``results/training_cost/`` of this checkout):
    ``{"command", "wall_time_s", "config", "table"}`` with ``table`` = :func:`cost_table` of its rows; ``None`` if
    there is none."""
    path = ROOT / "results" / "training_cost" / f"training_cost_{model.replace('/', '_')}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return {"command": record["command"], "wall_time_s": record.get("wall_time_s"),
            "config": record.get("config", record.get("args")), "table": cost_table(record["rows"])}


def main(argv=None) -> None:
    """Child-process entry of :func:`measure_method`: ``--method M --config JSON``; prints ``RESULT {json}``."""
    p = argparse.ArgumentParser(description="one method of routertune_lib.training_cost (internal)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--config", required=True, help="CostConfig as JSON")
    args = p.parse_args(argv)
    print("RESULT " + json.dumps(run_method(CostConfig.from_dict(json.loads(args.config)), args.method)))


if __name__ == "__main__":
    main()
