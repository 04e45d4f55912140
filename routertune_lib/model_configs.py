"""The paper's models as configurations (the hub is unreachable here), and shrunk random models built from them.

:data:`PAPER_CONFIGS` holds, per model the paper or a notebook's ``paper`` profile names, the fields of its public
``config.json`` (hub revision of late 2024) that fix the architecture: ``model_type``, vocabulary, widths, depth,
attention heads and KV heads (GQA / MHA / MLA), RoPE, positions, sliding window, tied embeddings, MoE fields.
``card_params`` is the parameter count its model card states (total; ``card_active`` for MoE models): the test suite
checks that the configuration gives it.

:func:`shrunk_config` keeps the architecture class, attention type (heads : KV heads ratio, MLA ranks scaled),
vocabulary size, RoPE, sliding window, tying and MoE routing (experts, top-k, shared experts, dense first layers)
and shrinks depth and widths; :func:`build_shrunk` gives a seeded random model of it. :func:`full_size` counts the
real model's parameters exactly (a meta-device instance: no memory). The real tokenizers cannot be had offline:
:func:`stand_in_tokenizer` is SmolLM2's (ChatML template) cut to the smallest paper vocabulary (its first 32000 ids and
the merges among them), so its ids fit every paper model; :func:`save_shrunk` writes model and tokenizer as a model
directory that ``load_model`` reads like any other.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from .data import cache_dir


@dataclass(frozen=True)
class PaperModel:
    """One paper model: hub id, the architecture fields of its ``config.json`` and its model card's size."""

    name: str
    hub_id: str
    config: dict
    card_params: float  # total parameters, as the model card states them
    card_active: float | None = None  # MoE: parameters active per token
    notes: str = ""


_LLAMA3 = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
               hidden_act="silu", attention_bias=False)


def _qwen25(vocab, hidden, inter, layers, heads, kv, max_pos, tie, eps=1e-6):
    return dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, rope_theta=1000000.0,
                max_position_embeddings=max_pos, sliding_window=max_pos, use_sliding_window=False,
                max_window_layers=layers, rms_norm_eps=eps, tie_word_embeddings=tie, bos_token_id=151643,
                eos_token_id=151643, hidden_act="silu")


PAPER_CONFIGS: dict[str, PaperModel] = {m.hub_id: m for m in [
    PaperModel("Llama-3-8B", "meta-llama/Meta-Llama-3-8B", _LLAMA3, 8.03e9),
    PaperModel("Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", {**_LLAMA3, "eos_token_id": 128009},
               8.03e9, notes="the paper's Figure 7 model"),
    PaperModel("Llama-2-13B", "meta-llama/Llama-2-13b-hf",
               dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                    num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, rope_theta=10000.0,
                    max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                    eos_token_id=2, hidden_act="silu"), 13.0e9),
    PaperModel("Mistral-7B", "mistralai/Mistral-7B-v0.1",
               dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=10000.0,
                    max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu"), 7.24e9),
    PaperModel("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", _qwen25(151936, 1536, 8960, 28, 12, 2, 131072, True), 1.54e9),
    PaperModel("Qwen2.5-3B", "Qwen/Qwen2.5-3B", _qwen25(151936, 2048, 11008, 36, 16, 2, 32768, True), 3.09e9),
    PaperModel("Qwen2.5-7B", "Qwen/Qwen2.5-7B", _qwen25(152064, 3584, 18944, 28, 28, 4, 131072, False), 7.61e9),
    PaperModel("Qwen2.5-14B", "Qwen/Qwen2.5-14B", _qwen25(152064, 5120, 13824, 48, 40, 8, 131072, False, 1e-5),
               14.7e9),
    PaperModel("OLMoE-1B-7B", "allenai/OLMoE-1B-7B-0924",
               dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                    num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                    num_experts_per_tok=8, norm_topk_prob=False, rope_theta=10000.0, max_position_embeddings=4096,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279,
                    bos_token_id=None, clip_qkv=None), 6.92e9, card_active=1.28e9),
    PaperModel("DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2-Lite",
               dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                    kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                    rope_theta=10000.0, max_position_embeddings=163840,
                    rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
                    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001),
               15.7e9, card_active=2.4e9, notes="the paper's 'DeepSeek-MoE' row (Table 7)"),
]}


def paper_model(name_or_hub_id: str) -> PaperModel:
    """The :class:`PaperModel` by hub id or paper name; ``KeyError`` listing the known ones otherwise."""
    if name_or_hub_id in PAPER_CONFIGS:
        return PAPER_CONFIGS[name_or_hub_id]
    for m in PAPER_CONFIGS.values():
        if m.name == name_or_hub_id:
            return m
    raise KeyError(f"{name_or_hub_id!r} is not a paper model; known: {sorted(PAPER_CONFIGS)}")


def full_config(name_or_hub_id: str) -> PretrainedConfig:
    """The real model's transformers config (``AutoConfig.for_model``)."""
    fields = dict(paper_model(name_or_hub_id).config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def shrunk_config(name_or_hub_id: str, num_layers: int = 2, hidden_size: int = 64, num_experts: int = 8,
                  max_position_embeddings: int | None = None) -> PretrainedConfig:
    """A small config of the same ``model_type`` and attention/MoE type, vocabulary, RoPE and sliding window.

    Heads are ``hidden_size // 16`` (head_dim 16) with the real heads : KV heads ratio (GQA stays GQA, MHA stays MHA);
    MLP widths keep their ratio to ``hidden_size`` (rounded to a multiple of 8); MoE keeps top-k, shared experts and
    the dense first layers with ``num_experts`` experts (at least top-k + 1); MLA ranks are scaled to the head size.
    The sliding window (Mistral) is kept, as are ``max_position_embeddings`` unless given.
    """
    real = paper_model(name_or_hub_id).config
    c = dict(real)
    scale = hidden_size / real["hidden_size"]

    def width(real_width: int) -> int:  # a multiple of 8: grouped expert matmuls need 16-byte strides in bf16
        return max(8, 8 * round(real_width * scale / 8))

    heads = max(1, hidden_size // 16)
    ratio = real["num_attention_heads"] // real["num_key_value_heads"]
    c.update(num_hidden_layers=num_layers, hidden_size=hidden_size, num_attention_heads=heads,
             num_key_value_heads=max(1, heads // ratio),
             intermediate_size=width(real["intermediate_size"]))
    if "head_dim" in real or real["model_type"] in ("llama", "mistral", "qwen2", "olmoe"):
        c["head_dim"] = hidden_size // heads
    if c.get("max_window_layers") is not None:
        c["max_window_layers"] = num_layers
    top_k = real.get("num_experts_per_tok")
    if top_k:
        experts = max(num_experts, top_k + 1)
        c.update({k: experts for k in ("num_experts", "n_routed_experts") if k in real})
    if "moe_intermediate_size" in real:
        c["moe_intermediate_size"] = width(real["moe_intermediate_size"])
    if real["model_type"] == "deepseek_v2":  # MLA: compressed KV rank and head dims scaled with the width
        c.update(kv_lora_rank=width(real["kv_lora_rank"]), qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16, first_k_dense_replace=min(real["first_k_dense_replace"], num_layers - 1))
    if max_position_embeddings is not None:
        c["max_position_embeddings"] = max_position_embeddings
    return AutoConfig.for_model(c.pop("model_type"), **c)


def build_shrunk(name_or_hub_id: str, seed: int = 0, **shrink):
    """A seeded random ``*ForCausalLM`` of :func:`shrunk_config` (float32, eval mode), ``name_or_path`` = hub id."""
    config = shrunk_config(name_or_hub_id, **shrink)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.name_or_path = paper_model(name_or_hub_id).hub_id
    return model


STAND_IN_FROM = "smollm2-135m"


def stand_in_tokenizer():
    """SmolLM2's tokenizer restricted to ids below the smallest paper vocabulary (BPE vocabulary and merges cut,
    special tokens and chat template kept); cached under ``<cache_dir()>/models/paper-stand-in-tokenizer``."""
    from .models import BUILTIN_MODELS, convert_builtin, builtin_cache_path

    target = cache_dir() / "models" / "paper-stand-in-tokenizer"
    if not target.is_dir():
        source = builtin_cache_path(STAND_IN_FROM)
        if not source.is_dir():
            convert_builtin(BUILTIN_MODELS[STAND_IN_FROM], source)
        size = min(m.config["vocab_size"] for m in PAPER_CONFIGS.values())
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".stand-in-") as scratch:
            tmp = Path(scratch) / "tokenizer"
            tmp.mkdir()
            for f in source.iterdir():
                if not f.name.startswith(("model", "config", "generation_config")):
                    shutil.copy(f, tmp)
            spec = json.loads((source / "tokenizer.json").read_text())
            vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < size}
            spec["model"]["vocab"] = vocab
            spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                                       if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
            spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < size]
            (tmp / "tokenizer.json").write_text(json.dumps(spec))
            try:
                tmp.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
    return AutoTokenizer.from_pretrained(target)


def save_shrunk(name_or_hub_id: str, out: str | Path, **shrink) -> Path:
    """Write :func:`build_shrunk` with :func:`stand_in_tokenizer` (whose special-token ids the config takes) to the
    model directory ``out`` (atomically: a sibling temp dir renamed into place); returns ``out``."""
    out = Path(out)
    tokenizer = stand_in_tokenizer()
    model = build_shrunk(name_or_hub_id, **shrink)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(tokenizer, key))
        setattr(model.generation_config, key, getattr(tokenizer, key))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        tmp = Path(scratch) / "model"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    return out


@dataclass(frozen=True)
class ModelSize:
    """Exact sizes of a real paper model (from its config, counted on the meta device)."""

    params: int  # all parameters
    active: int  # parameters used per token (MoE: the top-k of the routed experts)
    embedding: int  # input embedding (its FLOPs are a lookup)
    num_layers: int
    kv_bytes_per_token: int  # bf16 K/V cache per token over all layers


def full_size(name_or_hub_id: str) -> ModelSize:
    """Parameter counts of the real model and its bf16 KV-cache bytes per token (MLA: the decompressed K/V that
    transformers caches)."""
    config = full_config(name_or_hub_id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    params = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n)
    total_experts = getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None)
    active = params - (routed - routed * config.num_experts_per_tok // total_experts if total_experts else 0)
    embedding = model.get_input_embeddings().weight.numel()
    if config.model_type == "deepseek_v2":
        k_dim = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
        v_dim = config.num_attention_heads * config.v_head_dim
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        k_dim = v_dim = config.num_key_value_heads * head_dim
    return ModelSize(params, active, embedding, config.num_hidden_layers,
                     2 * config.num_hidden_layers * (k_dim + v_dim))


__all__ = ["PAPER_CONFIGS", "ModelSize", "PaperModel", "build_shrunk", "full_config", "full_size", "paper_model",
           "save_shrunk", "shrunk_config", "stand_in_tokenizer"]
