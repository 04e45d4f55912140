"""The paper models' configurations (checked against their model cards), shrunk builds with routers, the GPU
estimates, and ``reproduce --profile paper --check`` on every notebook."""

import json
from pathlib import Path

import pytest
import torch

from routertune_lib.model_configs import (PAPER_CONFIGS, build_shrunk, full_config, full_size, paper_model,
                                          shrunk_config, stand_in_tokenizer)
from routertune_lib.moe import expert_router_config, moe_layers
from routertune_lib.paper import PAPER_MODELS
from routertune_lib.routing import RouterConfig, attach_routers, routed_layers, routing_mode

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_every_paper_and_notebook_model_has_a_config():
    names = {m.name for m in PAPER_CONFIGS.values()}
    assert {*PAPER_MODELS} <= names
    assert {"Llama-3-8B-Instruct", "OLMoE-1B-7B", "DeepSeek-V2-Lite"} <= names
    for m in PAPER_MODELS.values():  # the hub ids the notebooks load
        assert m["hub_id"] in PAPER_CONFIGS
        assert full_config(m["hub_id"]).num_hidden_layers == m["num_layers"]
    studies = NOTEBOOKS.parent / "routertune_lib" / "studies"  # the notebooks' experiments (and their models)
    text = "".join(p.read_text() for p in [*NOTEBOOKS.glob("[0-9]*.ipynb"), *studies.glob("*.py")])
    for hub_id in ("allenai/OLMoE-1B-7B-0924", "deepseek-ai/DeepSeek-V2-Lite"):
        assert hub_id in text and hub_id in PAPER_CONFIGS


@pytest.mark.parametrize("hub_id", sorted(PAPER_CONFIGS))
def test_config_gives_the_model_card_size(hub_id):
    """Total parameters within 1% of the model card; MoE: active parameters (with or without the input embedding,
    as cards differ) within 5%."""
    m, size = paper_model(hub_id), full_size(hub_id)
    assert size.params == pytest.approx(m.card_params, rel=0.01)
    if m.card_active:
        assert min(abs(size.active - m.card_active), abs(size.active - size.embedding - m.card_active)) \
            < 0.05 * m.card_active


@pytest.mark.parametrize("hub_id", sorted(PAPER_CONFIGS))
def test_shrunk_model_keeps_the_architecture_and_runs_with_routers(hub_id):
    real, small = full_config(hub_id), shrunk_config(hub_id)
    assert type(small) is type(real) and small.vocab_size == real.vocab_size
    assert small.num_hidden_layers == 2
    assert (small.num_attention_heads == small.num_key_value_heads) == \
        (real.num_attention_heads == real.num_key_value_heads)  # MHA stays MHA, GQA stays GQA
    for key in ("rope_theta", "sliding_window", "tie_word_embeddings", "num_experts_per_tok", "n_shared_experts"):
        assert getattr(small, key, None) == getattr(real, key, None), key
    model = build_shrunk(hub_id)
    assert model.config.model_type == real.model_type and type(model).__name__.endswith("ForCausalLM")
    moe = real.model_type in ("olmoe", "deepseek_v2")
    config = (expert_router_config(model, capacity=0.5) if moe
              else RouterConfig(target="attn", level="sequence", num_layers=1, capacity=0.5))
    attach_routers(model, config)
    assert routed_layers(model) if not moe else moe_layers(model)
    ids = torch.randint(0, 32000, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with routing_mode(model, "real"):
        out = model(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (2, 7, real.vocab_size) and torch.isfinite(out.logits[mask.bool()]).all()


def test_stand_in_tokenizer_fits_every_vocabulary():
    tok = stand_in_tokenizer()
    assert len(tok) <= min(m.config["vocab_size"] for m in PAPER_CONFIGS.values())
    ids = tok.apply_chat_template([{"role": "user", "content": "Is the sky blue?"}], return_dict=True)["input_ids"]
    assert tok.decode(ids).count("Is the sky blue?") == 1


def test_estimate_scales_with_the_workload():
    from routertune_lib.paper_check import GPU, estimate

    speed = dict(kind="speed", model="meta-llama/Meta-Llama-3-8B", settings=2, prompts=64, prompt_len=512,
                 batch_size=32, new_tokens=128, repeats=3)
    one, two = estimate([speed]), estimate([speed, speed])
    assert two["gpu_s"] == pytest.approx(2 * one["gpu_s"])
    # decode dominates: 2 settings x 3 repeats x 2 batches x 128 steps, each reading 16 GB of bf16 weights
    assert one["gpu_s"] > 2 * 3 * 2 * 128 * 2 * 8.03e9 / GPU["hbm_bytes_per_s"]
    assert one["peak_bytes"] > 2 * 8.03e9 and one["fits"]
    full = dict(kind="cost", model="meta-llama/Meta-Llama-3-8B", method="full", samples=1000, global_batch=64,
                micro_batch=1, max_length=2048, steps_other=3)
    assert not estimate([full])["fits"]  # weights + gradients + AdamW moments of an 8B model: > 80 GB
    assert estimate([dict(kind="eval", model="smollm2-135m", tasks=["piqa"], shots=0, limit=None,
                          batch_size=16)])["gpu_s"] == 0.0  # not a paper model: not estimated


@pytest.mark.data
def test_offline_check_stands_in_for_gsm8k(monkeypatch):
    """Offline (as in CI), notebook 03's GSM8K comes from the arithmetic stand-in, shaped and sized as GSM8K."""
    from routertune_lib.evaluation import get_task, normalize_answer, tasks
    from routertune_lib.paper_check import GSM8K_SPLITS, offline_stand_ins

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(tasks.TASK_REGISTRY, "gsm8k", tasks.TASK_REGISTRY["gsm8k"])  # restored afterwards
    assert offline_stand_ins() == ["gsm8k"]
    gsm8k = get_task("gsm8k")
    docs = gsm8k.load("eval")
    assert len(docs) == GSM8K_SPLITS["eval"] and len(gsm8k.load("fewshot")) == GSM8K_SPLITS["fewshot"]
    arithmetic = get_task("arithmetic").load("eval")[0]
    assert docs[0]["question"] == arithmetic["question"]
    assert normalize_answer(gsm8k.doc_to_answer(docs[0])) == normalize_answer(arithmetic["answer"])


@pytest.mark.data
def test_reproduce_check_runs_every_notebook(tmp_path, capsys):
    """``reproduce --profile paper --check`` on every notebook (each notebook's paper code path on shrunk paper
    models, README): each runs to its end and its report line says passed, with a GPU estimate; notebook 04
    (Llama-3-8B: Router-Tuning, LoRA and full fine-tuning at the paper's length, micro batch and bf16 autocast)
    needs more than one GPU for full fine-tuning."""
    from routertune_lib.paper_check import run_check

    notebooks = sorted(nb.stem for nb in NOTEBOOKS.glob("[0-9]*.ipynb"))
    assert len(notebooks) >= 13
    assert run_check(NOTEBOOKS, out_dir=tmp_path)
    out = capsys.readouterr().out.splitlines()
    for nb in notebooks:
        executed = json.loads((tmp_path / f"{nb}.ipynb").read_text())
        assert not executed["metadata"]["papermill"]["exception"] and executed["metadata"]["papermill"]["end_time"]
        line = next(x for x in out if x.strip().startswith(f"{nb}:"))
        assert "passed" in line and "GPU-h" in line, line
    line = next(x for x in out if x.strip().startswith("04_training_cost:"))
    assert "meta-llama/Meta-Llama-3-8B" in line
    assert "EXCEEDS ONE GPU" in line  # full fine-tuning of 8B parameters with AdamW: > 80 GB


def _notebook(path: Path, code: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('profile = "cpu"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def test_check_runs_notebooks_at_once_and_reports_each(tmp_path):
    """Notebooks checked at once: each in its own kernel with ``cores // jobs`` torch threads and glibc keeping
    freed blocks, in the paper profile after the install cell; a failing one is reported with its error and wall
    time, the other still passes."""
    import os

    from routertune_lib.paper_check import KEEP_FREED_BYTES, check_notebooks

    threads = max(1, (os.cpu_count() or 1) // 2)
    _notebook(tmp_path / "01_ok.ipynb", "import os, torch\n"
              f"assert profile == 'paper' and torch.get_num_threads() == {threads}, torch.get_num_threads()\n"
              f"assert os.environ['MALLOC_MMAP_THRESHOLD_'] == '{KEEP_FREED_BYTES}'")
    _notebook(tmp_path / "02_fails.ipynb", "raise ValueError('broken on purpose')")
    records = check_notebooks(tmp_path, out_dir=tmp_path / "out", models_dir=tmp_path / "models", jobs=2)
    assert list(records) == ["01_ok", "02_fails"]
    assert records["01_ok"]["error"] is None and records["01_ok"]["seconds"] > 0
    assert "ValueError: broken on purpose" in records["02_fails"]["error"] and records["02_fails"]["seconds"] > 0
    assert (tmp_path / "out" / "01_ok.ipynb").is_file() and (tmp_path / "out" / "02_fails.ipynb").is_file()
