"""Cached router tuning and the table / speed helpers of ``routertune_lib.experiments`` (tiny models, seconds)."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from routertune_lib import experiments, paper
from routertune_lib.evaluation import EvalResults, TaskResult
from routertune_lib.models import tiny_random_model
from routertune_lib.routing import RouterConfig, attach_routers, load_routers, routed_layers
from routertune_lib.training import TrainConfig


@pytest.mark.model  # tiny_random_model reads the SmolLM2 config and tokenizer, converted from its GGUF
def test_tuned_routers_trains_once_then_returns_the_cached_checkpoint(tmp_path, monkeypatch):
    model, tok = tiny_random_model()
    monkeypatch.setattr(experiments, "cache_dir", lambda: tmp_path / "cache")  # routers only; data stays cached
    calls = []
    real_train = experiments.train_routers

    def spy(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(experiments, "train_routers", spy)
    rc = RouterConfig(target="attn", level="sequence", num_layers=2)
    tc = TrainConfig(learning_rate=1e-3, global_batch_size=4, micro_batch_size=2, max_length=128)

    path = experiments.tuned_routers(None, rc, tc, num_samples=8, model=model, tokenizer=tok)
    assert path.is_file() and path.parent == tmp_path / "cache" / "routers"
    assert getattr(model, "routertune", None) is None  # given model handed back dense
    record = experiments.router_record(path)
    assert record["steps"] == 2 and record["key"]["data"]["num_samples"] == 8
    log = pd.read_csv(record["train_log"])  # the per-step log outlives the training's work directory
    assert log.step.tolist() == [1, 2] and log.capacity.iloc[0] == 1.0 and "capacity_weight" in log
    mtime = path.stat().st_mtime_ns

    # same key, other micro batch and output dir (not part of the key): cached, no training
    again = experiments.tuned_routers(None, rc, TrainConfig(**{**tc.to_dict(), "micro_batch_size": 4,
                                                               "output_dir": str(tmp_path / "x")}),
                                      num_samples=8, model=model, tokenizer=tok)
    assert again == path and path.stat().st_mtime_ns == mtime and len(calls) == 1

    # a different router config, train config or data is another key
    other = experiments.tuned_routers(None, RouterConfig(target="mlp", level="token", num_layers=2), tc,
                                      num_samples=8, model=model, tokenizer=tok)
    assert other != path and len(calls) == 2
    assert experiments.tuned_routers(None, rc, tc, num_samples=12, model=model, tokenizer=tok) not in (path, other)
    assert not list((tmp_path / "cache" / "routers").glob(".*work-*"))  # work dirs cleaned up

    loaded = load_routers(tiny_random_model()[0], path)
    assert sorted(routed_layers(loaded)) == rc.resolve_layers(4)


@pytest.mark.model  # tiny_random_model reads the SmolLM2 config and tokenizer, converted from its GGUF
def test_tuned_routers_refuses_a_routed_model(tmp_path, monkeypatch):
    model, tok = tiny_random_model()
    monkeypatch.setattr(experiments, "cache_dir", lambda: tmp_path / "cache")
    attach_routers(model, RouterConfig(num_layers=2))
    with pytest.raises(ValueError, match="without routers"):
        experiments.tuned_routers(None, RouterConfig(num_layers=2), TrainConfig(), model=model, tokenizer=tok)


@pytest.mark.model  # tiny_random_model reads the SmolLM2 config and tokenizer, converted from its GGUF
def test_tuned_routers_caches_the_lora_adapter_and_hands_the_model_back_dense(tmp_path, monkeypatch):
    import torch

    from routertune_lib.evaluation import model_fingerprint
    from routertune_lib.training import LoraSettings

    model, tok = tiny_random_model()
    monkeypatch.setattr(experiments, "cache_dir", lambda: tmp_path / "cache")
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    trained_logits = []
    real_train = experiments.train_routers

    def spy(*args, **kwargs):  # the trained (unmerged) PeftModel's output, before tuned_routers unloads it
        result = real_train(*args, **kwargs)
        result.model.eval()
        with torch.no_grad():
            trained_logits.append(result.model(input_ids=ids).logits)
        return result

    monkeypatch.setattr(experiments, "train_routers", spy)
    rc = RouterConfig(target="attn", level="sequence", num_layers=2)
    lora = LoraSettings(r=2, alpha=4.0, dropout=0.0)
    tc = TrainConfig(learning_rate=1e-2, global_batch_size=4, micro_batch_size=2, max_length=128, lora=lora)

    path = experiments.tuned_routers(None, rc, tc, num_samples=8, model=model, tokenizer=tok)
    adapter = experiments.tuned_adapter(path)
    assert adapter is not None and (adapter / "adapter_config.json").is_file()
    assert experiments.router_record(path)["adapter"] == str(adapter)
    # the caller's model is dense again: no routers, no LoRA layers, same output
    assert getattr(model, "routertune", None) is None and not hasattr(model, "peft_config")
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense_logits, rtol=0, atol=0)
    # the cached routers + merged adapter reproduce the trained model; the eval cache key sees the merged weights
    with experiments.routed_copy(model, path, adapter) as loaded:
        assert not [n for n, _ in loaded.named_parameters() if "lora_" in n]
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, trained_logits[0], rtol=1e-4, atol=1e-4)
        assert model_fingerprint(loaded)["weights"] != model_fingerprint(model)["weights"]
    assert experiments.tuned_routers(None, rc, tc, num_samples=8, model=model, tokenizer=tok) == path
    assert len(trained_logits) == 1  # cached

    # LoRA alone (routers not trained): zero routers, its own key, an adapter that changes the dense model
    alone = experiments.tuned_routers(None, rc, TrainConfig(**{**tc.to_dict(), "train_routers": False}),
                                      num_samples=8, model=model, tokenizer=tok)
    assert alone != path and experiments.router_record(alone)["final_capacity"] == 1.0
    with experiments.routed_copy(model, alone) as routers_only:
        assert all((layer.router.weight == 0).all() for layer in routed_layers(routers_only).values())
    with experiments.routed_copy(model, adapter_path=experiments.tuned_adapter(alone)) as lora_only:
        assert getattr(lora_only, "routertune", None) is None
        with torch.no_grad():
            torch.testing.assert_close(lora_only(input_ids=ids).logits, trained_logits[1], rtol=1e-4, atol=1e-4)
        assert model_fingerprint(lora_only)["weights"] != model_fingerprint(model)["weights"]
    assert experiments.tuned_adapter(experiments.tuned_routers(None, rc, TrainConfig(**{**tc.to_dict(), "lora": None}),
                                                               num_samples=8, model=model, tokenizer=tok)) is None


def test_routed_copy_shares_the_base_weights_and_leaves_the_base_dense(tmp_path):
    from conftest import tiny_model
    from routertune_lib.routing import save_routers

    model = tiny_model()
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    routed = attach_routers(copy.deepcopy(model), RouterConfig(level="sequence", num_layers=3))
    experiments.randomize_routers(routed, seed=1)
    path = save_routers(routed, tmp_path / "r.safetensors")
    with experiments.routed_copy(model, path) as shared:
        base = dict(model.named_parameters())
        assert all(p is base[n] for n, p in shared.named_parameters() if ".router." not in n)
        with torch.no_grad():
            torch.testing.assert_close(shared(input_ids=ids).logits, routed(input_ids=ids).logits, rtol=0, atol=0)
    assert getattr(model, "routertune", None) is None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=0, atol=0)


def _results(scores: dict[str, list[float]], executed: float | None = None) -> EvalResults:
    tasks = {}
    for t, xs in scores.items():
        recs = [{"task": t, "doc_id": i, "acc": x, "chosen": int(x)} for i, x in enumerate(xs)]
        tasks[t] = TaskResult(t, "acc", 0, len(xs), {"acc": sum(xs) / len(xs)}, {"acc": 0.0}, 0.5, recs)
    routing = {} if executed is None else {"layers": {1: executed, 2: executed}, "overall": executed}
    return EvalResults(tasks, {}, routing)


def test_comparison_and_accuracy_tables():
    dense = _results({"piqa": [1, 1, 0, 1], "boolq": [1, 0, 1, 0]})
    routed = _results({"piqa": [1, 0, 0, 1], "boolq": [1, 0, 1, 0]}, executed=0.5)
    from routertune_lib.evaluation import compare

    long = experiments.comparison_frame(compare(dense, routed, n_boot=200))
    assert list(long.task) == ["piqa", "boolq", "average"]
    piqa = long.set_index("task").loc["piqa"]
    assert piqa.a == 75.0 and piqa.b == 50.0 and piqa["diff"] == -25.0
    # every piqa difference is 0 or -1 with P(0) = 3/4 per draw, so the 97.5th bootstrap percentile is exactly 0;
    # identical boolq results give a zero-width interval; the frame only scales compare() by 100
    expected = compare(dense, routed, n_boot=200)["tasks"]["piqa"]
    assert (piqa.ci_low, piqa.ci_high) == (100 * expected["ci_low"], 0.0) and piqa.ci_low < -25
    assert tuple(long.set_index("task").loc["boolq", ["diff", "ci_low", "ci_high"]]) == (0.0, 0.0, 0.0)
    assert long.set_index("task").loc["average", "diff"] == pytest.approx(-12.5)

    wide = experiments.accuracy_table({"dense": dense, "routed": routed}, baseline="dense", n_boot=200)
    assert list(wide.columns) == ["setting", "piqa", "boolq", "avg", "diff", "ci_low", "ci_high", "executed"]
    d, r = wide.iloc[0], wide.iloc[1]
    assert (d["diff"], d.executed, r.executed) == (0.0, 1.0, 0.5)
    assert r.avg == pytest.approx(50.0) and r["diff"] == pytest.approx(-12.5)
    # the average's bootstrap is the mean of piqa's replicates (same seed, same draws) and boolq's zeros
    assert (r.ci_low, r.ci_high) == (pytest.approx(piqa.ci_low / 2), 0.0)
    with pytest.raises(ValueError, match="baseline"):
        experiments.accuracy_table({"routed": routed}, baseline="dense")
    assert experiments.overall_skip(routed, num_hidden_layers=4) == pytest.approx(0.25)
    assert experiments.overall_skip(dense, num_hidden_layers=4) == 0.0


def test_paper_reference_data_is_consistent():
    for name, row in paper.PAPER_TABLE2.items():
        mean = experiments.paper_tasks_mean(row, experiments.PAPER_TASKS)
        assert math.isclose(mean, row["avg"], abs_tol=0.06), name
    assert experiments.paper_tasks_mean({"piqa": 1.0}, ["boolq"]) is None


@pytest.mark.model  # tiny_random_model reads the SmolLM2 config and tokenizer, converted from its GGUF
def test_profiles_and_speedups():
    with pytest.raises(ValueError, match="valid profiles"):
        experiments.profile_settings("laptop")
    assert experiments.profile_train_config("smoke", seed=3).seed == 3
    model, _ = tiny_random_model()
    import copy

    routed = attach_routers(copy.deepcopy(model), RouterConfig(num_layers=2))
    rows = experiments.measure_speedups(model, {"routed": routed}, batch_size=2, new_tokens=2, repeats=3,
                                        prompt_len=8, num_prompts=2)
    assert isinstance(rows, pd.DataFrame) and list(rows.setting) == ["dense", "routed"]
    assert rows.speedup.iloc[0] == 1.0 and rows.kv_ratio.iloc[0] == 1.0
    # the speed-up is the median of per-round ratios (not the ratio of medians), with its CI
    per_round = [d / r for d, r in zip(rows.round_generate_s.iloc[0], rows.round_generate_s.iloc[1])]
    assert rows.speedup.iloc[1] == pytest.approx(float(np.median(per_round)))
    assert rows.speedup_ci_low.iloc[1] <= rows.speedup.iloc[1] <= rows.speedup_ci_high.iloc[1]
    assert rows.kv_ratio.iloc[1] == 1.0  # zero routers execute every layer: the same cache as dense


@pytest.mark.model  # tiny_random_model reads the SmolLM2 config and tokenizer, converted from its GGUF
def test_load_base_model_builds_tiny_random_models_of_builtin_architectures():
    model, tok = experiments.load_base_model("tiny-random-smollm2-135m")
    assert model.config.name_or_path == "tiny-random-smollm2-135m" and model.config.num_hidden_layers == 4
    assert model.config.model_type == experiments.load_base_model(None)[0].config.model_type == "llama"
    assert tok.pad_token_id is not None
    with pytest.raises(ValueError, match="tiny-random-smollm2-135m"):
        experiments.load_base_model("tiny-random-gpt2")


def test_paper_models_cover_the_models_of_figures_5_6_and_table_5():
    for curves in (paper.PAPER_FIGURE5, paper.PAPER_FIGURE6):
        for name, points in curves.items():
            assert max(points) < paper.PAPER_MODELS[name]["num_layers"], name  # routed layers exclude the last
    assert set(paper.PAPER_TABLE5) <= set(paper.PAPER_MODELS)


def test_study_protocol_keeps_the_router_cache_keys_and_checks_profiles():
    from routertune_lib.studies import protocol

    # the notebooks' routers before the move to studies: same config, so the same cached checkpoints
    assert protocol.mindskip_config(30) == RouterConfig(target="attn", level="sequence", num_layers=15, capacity=0.5,
                                                        capacity_weight=0.1)
    assert protocol.mindskip_config(30, num_layers=24, target="mlp", level="token") == RouterConfig(
        target="mlp", level="token", num_layers=24, capacity=0.5, capacity_weight=0.1)
    with pytest.raises(ValueError, match=r"'laptop'.*valid profiles: \['cpu', 'smoke'\]"):
        protocol.settings_for({"smoke": {}, "cpu": {}}, "laptop")
    assert protocol.resolved(0.1, 2.0) and protocol.resolved(-2.0, -0.1) and not protocol.resolved(-0.1, 0.1)
    assert protocol.shots_label({"shots": None}) == "paper shots" and protocol.shots_label({"shots": 5}) == "5-shot"


def test_training_data_plans_table6_then_the_figure7_ladder():
    from routertune_lib.studies.training_data import planned_runs

    assert planned_runs(["offline-mix", "offline-mix:sciq"], 256, [64, 256]) == [
        ("offline-mix", 256), ("offline-mix:sciq", 256), ("offline-mix", 64)]


def test_plot_helpers_draw_ci_bars_and_save_atomically(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from routertune_lib import plots

    ours = pd.DataFrame({"diff": [1.0, -2.0], "ci_low": [0.0, -3.0], "ci_high": [3.0, -1.5]})
    below, above = plots.ci_yerr(ours)
    assert list(below) == [1.0, 1.0] and list(above) == [2.0, 0.5]
    fig, ax = plt.subplots()
    plots.diff_bars(ax, ["a", "b"], ours, "ours", {"paper": [0.5, -1.0]})
    assert len(ax.patches) == 4 and [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    path = plots.save_figure(fig, tmp_path, "f")
    assert path == tmp_path / "f.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary file left
    plt.close(fig)


def test_executed_fractions_per_layer_on_texts():
    model, tok = tiny_random_model()
    attach_routers(model, RouterConfig(target="attn", level="sequence", num_layers=2))
    texts = ["The sky is blue because of Rayleigh scattering.", "Two plus two is four.", "Hello"]
    dense = experiments.executed_fractions(model, texts, tok, max_length=32, batch_size=2)
    assert dense == {"layers": {1: 1.0, 2: 1.0}, "overall": 1.0}  # zero routers execute everything
    experiments.randomize_routers(model, seed=0)
    from routertune_lib.routing import set_thresholds

    set_thresholds(model, 1.0)  # nothing scores >= 1
    assert experiments.executed_fractions(model, texts, tok, max_length=32)["overall"] == 0.0
    batches = experiments.conversation_batches(texts, tok, max_length=32, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
