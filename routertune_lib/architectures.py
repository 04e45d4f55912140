"""Where the parts of a decoder layer live, per architecture family (keyed by ``config.model_type``).

Routing re-composes a decoder layer from its parts (norms, attention, MLP) so that each sub-layer can be run on a
subset of rows or tokens. The parts differ between families only in which norms surround each sub-layer; that
difference is data here, never a branch on a model name elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Attribute names of one decoder layer's parts.

    A layer computes ``h = h + post_attn(attn(pre_attn(h)))`` then ``h = h + post_mlp(mlp(pre_mlp(h)))``;
    a ``None`` norm is the identity.
    """

    family: str
    pre_attn_norm: str = "input_layernorm"
    post_attn_norm: str | None = None
    pre_mlp_norm: str = "post_attention_layernorm"
    post_mlp_norm: str | None = None
    attention: str = "self_attn"
    mlp: str = "mlp"


LLAMA_LIKE = ArchSpec(family="llama")
GEMMA3 = ArchSpec(
    family="gemma3",
    post_attn_norm="post_attention_layernorm",
    pre_mlp_norm="pre_feedforward_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gemma3_text": GEMMA3,
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The ``ArchSpec`` of a causal LM; raises ``ValueError`` naming the supported ``model_type`` values."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Routers are not supported for model_type {model_type!r} ({type(model).__name__}). "
            f"Supported model types: {sorted(ARCHITECTURES)} (Llama, Mistral, Qwen2, Gemma3 text decoders)."
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder layers of a ``*ForCausalLM`` model (``model.model.layers``; peft-wrapped too)."""
    if hasattr(model, "get_base_model"):  # a peft PeftModel around the causal LM
        model = model.get_base_model()
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no `model.layers` ModuleList; pass a *ForCausalLM model "
            f"(e.g. from routertune_lib.load_model)."
        )
    return layers


def base_model(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside DDP / peft wrappers (where the routers live)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model

