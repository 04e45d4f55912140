"""Router-Tuning trainer: tokenization, what trains, capacity loss, resume, determinism, calibration, multi-process."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _two_process_train import TRAIN, conversations, tiny_tokenizer
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file

from routertune_lib.routing import (
    LayerDecision,
    RouterConfig,
    RoutingContext,
    RoutingTrace,
    attach_routers,
    detach_routers,
    router_parameters,
    routed_layers,
    set_thresholds,
)
from routertune_lib.calibration import _router_scores, threshold_for
from routertune_lib.training import (
    LoraSettings,
    TrainConfig,
    calibrate_thresholds,
    capacity_penalty,
    tokenize_conversations,
    train_routers,
)


def _config(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig(**{**TRAIN, **kw}, output_dir=str(tmp_path / name))


def _routers(model) -> dict[str, torch.Tensor]:
    return {str(i): layer.router.weight.detach().clone() for i, layer in routed_layers(model).items()}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()}


# -- tokenization and config --------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_assistant_turns(caplog):
    tok = tiny_tokenizer()
    conv = {"messages": [
        {"role": "system", "content": "be nice"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello."}, {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ok bye"},
    ]}
    (row,) = tokenize_conversations(tok, [conv], max_length=200)
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(conv["messages"], tokenize=False)
    labelled = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert [label for label in row["labels"] if label != -100] == labelled
    assert tok.decode(labelled) == "hello.<|end|>\nok bye<|end|>\n"

    # truncated inside the first user turn: no assistant token left -> dropped, counted and logged
    with caplog.at_level(logging.WARNING, logger="routertune_lib.training"):
        rows = tokenize_conversations(tok, [conv, conv], max_length=20)
    assert rows == [] and "dropped 2 of 2 conversations" in caplog.text


def test_train_config_validation():
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        TrainConfig(global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig(train_routers=False)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="valid keys: .*learning_rate"):
        TrainConfig.from_dict({"lr": 1e-4})
    cfg = TrainConfig.from_dict({"lora": {"r": 4}, "train_routers": False})
    assert cfg.lora == LoraSettings(r=4) and cfg.lora.target_modules[0] == "q_proj"
    with pytest.raises(ValueError, match="valid keys"):
        TrainConfig.from_dict({"lora": {"rank": 4}})


# -- what trains ---------------------------------------------------------------------------------------------------


def test_only_routers_change_and_backbone_is_bit_identical(tmp_path):
    model = tiny_model("qwen2")
    before = _snapshot(model)
    result = train_routers(model, tiny_tokenizer(), conversations(16), RouterConfig(num_layers=3), _config(tmp_path))
    after = _snapshot(model)
    routers = {n for n in after if ".router." in n}
    assert len(routers) == 3 and result.trainable_parameters == 3 * 32
    assert all(torch.equal(before[n], after[n]) for n in before)  # backbone untouched, bit for bit
    assert all(not torch.equal(after[n], torch.zeros_like(after[n])) for n in routers)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert result.completed and result.router_path == tmp_path / "run" / "routers.safetensors"
    saved = load_file(str(result.router_path))
    assert all(torch.equal(saved[f"layers.{i}.router.weight"], w) for i, w in _routers(model).items())
    rows = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and {"capacity_L2", "task_loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert (tmp_path / "run" / "train_log.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("train_routers_too", [True, False])
def test_lora_changes_only_lora_and_router_params(tmp_path, train_routers_too):
    rc = RouterConfig(num_layers=3, level="token")
    model = attach_routers(tiny_model("llama"), rc)  # routers already attached: train_routers uses them
    base_before = _snapshot(model)
    cfg = _config(tmp_path, lora=LoraSettings(r=2, dropout=0.0), train_routers=train_routers_too)
    result = train_routers(model, tiny_tokenizer(), conversations(16), rc, cfg)
    after = _snapshot(model)  # the base model, with LoRA modules injected in place
    lora = {n for n in after if "lora_" in n}
    assert lora and all(torch.equal(base_before[n], after[n]) for n in base_before if ".router." not in n)
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in lora if "lora_B" in n)
    routers_changed = [not torch.equal(after[n], base_before[n]) for n in after if ".router." in n]
    assert all(routers_changed) if train_routers_too else not any(routers_changed)
    assert (result.adapter_path / "adapter_model.safetensors").is_file()
    adapter = load_file(str(result.adapter_path / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)  # adapters only: no router or backbone weights
    assert type(result.model).__name__.startswith("PeftModel")
    assert result.history[-1]["capacity"] <= 1.0


# -- the capacity loss -------------------------------------------------------------------------------------------


def test_capacity_loss_pushes_capacity_toward_the_target(tmp_path):
    rc = RouterConfig(num_layers=3, level="token", capacity=0.5, capacity_weight=1.0)
    result = train_routers(tiny_model("llama"), tiny_tokenizer(), conversations(16), rc, _config(tmp_path, epochs=2))
    capacities = [r["capacity"] for r in result.history]
    penalties = [r["capacity_loss"] for r in result.history]
    assert capacities[0] == 1.0 and penalties[0] == pytest.approx(0.5)  # zero routers: dense
    # Adam's first step moves every score the same distance, so the first drop can overshoot the target
    assert capacities[-1] < 0.9 and penalties[-1] < 0.4 * penalties[0], capacities


def test_adam_from_zero_routers_makes_the_same_decisions_at_any_learning_rate_scale(tmp_path):
    """Zero-initialised routers without a bias make their decisions by the sign of ``w . x``, and Adam moves ``w``
    by ``lr`` times a direction that does not depend on ``lr`` (while ``sigmoid'`` stays ~1/4 and ``eps`` is
    negligible), so ``lr`` scales ``w`` and changes (almost) no decision: the lr grid does not change what is
    learned."""
    tok, data = tiny_tokenizer(), conversations(16)
    rc = RouterConfig(num_layers=3, level="token", capacity=0.5, capacity_weight=1.0)
    runs = {}
    for lr in (1e-3, 1e-5):
        model = tiny_model("llama")
        result = train_routers(model, tok, data, rc, _config(tmp_path, f"lr{lr}", learning_rate=lr, epochs=3))
        runs[lr] = (result.history, _routers(model))
    (fast, w_fast), (slow, w_slow) = runs[1e-3], runs[1e-5]
    gap = max(abs(a["capacity"] - b["capacity"]) for a, b in zip(fast, slow))
    ratio = [float((a * b).sum() / (b * b).sum()) for a, b in zip(w_fast.values(), w_slow.values())]
    cos = [float(F.cosine_similarity(a.flatten(), b.flatten(), 0)) for a, b in zip(w_fast.values(), w_slow.values())]
    # the weights are the same up to the factor 100 (cosine 1 to 6 digits); a token within rounding of its threshold
    # may fall the other way, so the capacities agree to a few tokens in a thousand, not bit for bit
    assert all(r == pytest.approx(100, rel=1e-3) for r in ratio) and min(cos) > 0.99999
    assert gap < 0.005 and len({r["capacity"] for r in fast}) > 1  # and the decisions did change in training


def test_without_capacity_loss_routers_still_get_a_gradient_at_step_zero(tmp_path):
    model = tiny_model("llama")
    rc = RouterConfig(num_layers=3, capacity_weight=0.0)
    result = train_routers(model, tiny_tokenizer(), conversations(16), rc, _config(tmp_path), stop_after=1)
    assert result.history[0]["capacity"] == 1.0 and result.history[0]["capacity_loss"] == 0.0
    # Adam's first step moves every weight with a non-zero gradient by ~lr and leaves zero-gradient ones at 0
    assert all((w != 0).all() for w in _routers(model).values())
    assert not result.completed and result.router_path.parent.name == "step-000001"


# -- capacity loss and training forward options -------------------------------------------------------------------


def test_option_validation():
    with pytest.raises(ValueError, match="capacity_loss must be one of .*'l2'"):
        RouterConfig(capacity_loss="l2")
    with pytest.raises(ValueError, match="training_forward must be one of"):
        TrainConfig(training_forward="soft")
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="capacity_weight_lr"):
            RouterConfig(capacity_loss="dual", capacity_weight_lr=bad)
    assert RouterConfig().capacity_loss == "hinge" and TrainConfig().training_forward == "masked"


def _trace(fractions: list[float], n: int = 10) -> RoutingTrace:
    """Sequence decisions of ``n`` rows per layer with the given executed fractions; STE-like keeps with a grad."""
    decisions = []
    for i, f in enumerate(fractions):
        keep = (torch.arange(n) < round(f * n)).float().requires_grad_(True)
        decisions.append(LayerDecision(i, keep, torch.ones(n), None))
    return RoutingTrace(decisions)


def test_hinge_is_zero_at_or_below_the_target_and_linear_sums_the_layers():
    hinge = RouterConfig(capacity=0.5, capacity_weight=2.0)
    linear = RouterConfig(capacity=0.5, capacity_weight=2.0, capacity_loss="linear")
    for fractions in ([0.5, 0.5], [0.3, 0.5]):
        trace = _trace(fractions)
        penalty = capacity_penalty(trace, hinge)
        penalty.backward()
        assert penalty.item() == 0.0 and all(d.keep.grad.abs().sum() == 0 for d in trace.decisions)
    trace = _trace([0.8, 0.6])
    assert capacity_penalty(trace, hinge).item() == pytest.approx(2.0 * (0.7 - 0.5))
    penalty = capacity_penalty(trace, linear)
    assert penalty.item() == pytest.approx(2.0 * (0.8 + 0.6))
    penalty.backward()  # every input of every layer is pushed towards skipping, below the target too
    assert all(torch.allclose(d.keep.grad, torch.full((10,), 2.0 / 10)) for d in trace.decisions)
    assert capacity_penalty(_trace([0.2, 0.1]), linear).item() > 0


@pytest.mark.parametrize("capacity_loss", ["hinge", "linear", "dual"])
@pytest.mark.parametrize("training_forward", ["masked", "real"])
def test_every_loss_and_training_forward_gives_every_router_a_gradient(capacity_loss, training_forward):
    tok = tiny_tokenizer()
    batch = tokenize_conversations(tok, conversations(4), 96)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["input_ids"]) for r in batch], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r["input_ids"]), dtype=torch.long) for r in batch],
                                           batch_first=True)
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    rc = RouterConfig(num_layers=3, capacity_loss=capacity_loss, capacity_weight=1.0)
    attach_routers(model, rc)
    for name in ("task", "capacity"):
        ctx = RoutingContext(training_forward, mask, RoutingTrace(), training_forward=training_forward)
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), routing_context=ctx,
                    use_cache=False)
        loss = out.loss if name == "task" else capacity_penalty(ctx.trace, rc)
        grads = torch.autograd.grad(loss, router_parameters(model))
        assert all(g.abs().sum() > 0 for g in grads), name


def test_linear_capacity_loss_pushes_capacity_below_the_hinge_target(tmp_path):
    rc = RouterConfig(num_layers=3, level="token", capacity=0.5, capacity_weight=1.0, capacity_loss="linear")
    result = train_routers(tiny_model("llama"), tiny_tokenizer(), conversations(16), rc, _config(tmp_path, epochs=2))
    capacities = [r["capacity"] for r in result.history]
    assert capacities[0] == 1.0 and result.history[0]["capacity_loss"] == pytest.approx(3.0)  # 3 layers at 1.0
    assert capacities[-1] < 0.5, capacities


def test_dual_penalty_is_two_sided_and_its_multiplier_follows_the_capacity_error(tmp_path):
    dual = RouterConfig(capacity=0.5, capacity_weight=2.0, capacity_loss="dual")
    above, below = _trace([0.8, 0.6]), _trace([0.3, 0.1])
    assert capacity_penalty(above, dual).item() == pytest.approx(2.0 * 0.2)
    assert capacity_penalty(above, dual, weight=-1.0).item() == pytest.approx(-0.2)
    penalty = capacity_penalty(below, dual)  # below the target: negative, and still a gradient (the hinge has none)
    penalty.backward()
    assert penalty.item() == pytest.approx(2.0 * -0.3)
    assert all(torch.allclose(d.keep.grad, torch.full((10,), 2.0 / 20)) for d in below.decisions)

    rc = RouterConfig(num_layers=3, level="token", capacity=0.5, capacity_weight=0.1, capacity_loss="dual",
                      capacity_weight_lr=4.0)
    # one micro-batch per step, so the logged penalty is the step's lambda times the step's capacity error
    result = train_routers(tiny_model("llama"), tiny_tokenizer(), conversations(16), rc,
                           _config(tmp_path, epochs=3, micro_batch_size=8))
    rows = result.history
    assert rows[0]["capacity_weight"] == pytest.approx(0.1) and rows[0]["capacity"] == 1.0
    for a, b in zip(rows, rows[1:]):  # lambda_{t+1} = lambda_t + lr * (capacity_t - target)
        assert b["capacity_weight"] == pytest.approx(a["capacity_weight"] + 4.0 * (a["capacity"] - 0.5))
        assert a["capacity_loss"] == pytest.approx(a["capacity_weight"] * (a["capacity"] - 0.5), abs=1e-6)
    assert "capacity_weight" in result.log_path.with_suffix(".csv").read_text().splitlines()[0].split(",")


def test_dual_multiplier_is_checkpointed_and_resumed(tmp_path):
    tok, data = tiny_tokenizer(), conversations(16)
    rc = RouterConfig(num_layers=3, level="token", capacity_weight=0.1, capacity_loss="dual", capacity_weight_lr=4.0)
    full = tiny_model("llama")
    whole = train_routers(full, tok, data, rc, _config(tmp_path, "full", epochs=2))
    cfg = _config(tmp_path, "resumed", epochs=2)
    train_routers(tiny_model("llama"), tok, data, rc, cfg, stop_after=2)
    state = torch.load(Path(cfg.output_dir) / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    assert state["capacity_weight"] == pytest.approx(whole.history[2]["capacity_weight"])
    resumed = tiny_model("llama")
    result = train_routers(resumed, tok, data, rc, cfg, resume=True)
    assert [r["capacity_weight"] for r in result.history] == [r["capacity_weight"] for r in whole.history[2:]]
    assert all(torch.equal(a, b) for a, b in zip(_routers(full).values(), _routers(resumed).values()))


def test_router_bias_trains_and_resumes(tmp_path):
    tok, data, rc = tiny_tokenizer(), conversations(16), RouterConfig(num_layers=3, router_bias=True)
    full = tiny_model("llama")
    train_routers(full, tok, data, rc, _config(tmp_path, "full"))
    assert all(layer.router.bias.abs().sum() > 0 for layer in routed_layers(full).values())
    train_routers(tiny_model("llama"), tok, data, rc, _config(tmp_path, "resumed"), stop_after=1)
    resumed = tiny_model("llama")
    train_routers(resumed, tok, data, rc, _config(tmp_path, "resumed"), resume=True)
    assert all(torch.equal(a.router.bias, b.router.bias) and torch.equal(a.router.weight, b.router.weight)
               for a, b in zip(routed_layers(full).values(), routed_layers(resumed).values()))


def test_options_round_trip_through_checkpoints_and_resume(tmp_path, caplog):
    tok, data = tiny_tokenizer(), conversations(16)
    rc = RouterConfig(num_layers=3, capacity_loss="linear", capacity_weight=1.0)
    full = tiny_model("llama")
    train_routers(full, tok, data, rc, _config(tmp_path, "full", training_forward="real"))
    cfg = _config(tmp_path, "resumed", training_forward="real")
    train_routers(tiny_model("llama"), tok, data, rc, cfg, stop_after=1)
    state = torch.load(Path(cfg.output_dir) / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=False)
    assert state["train_config"]["training_forward"] == "real" and state["router_config"]["capacity_loss"] == "linear"
    # resumed with the defaults: the checkpoint's options win, so the routers equal the uninterrupted run's
    resumed = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="routertune_lib.training"):
        result = train_routers(resumed, tok, data, RouterConfig(num_layers=3, capacity_weight=1.0),
                               TrainConfig(**{**cfg.to_dict(), "training_forward": "masked"}), resume=True)
    assert "training_forward='masked' differs" in caplog.text and "capacity_loss='hinge' differs" in caplog.text
    assert result.completed
    assert all(torch.equal(a, b) for a, b in zip(_routers(full).values(), _routers(resumed).values()))
    with safe_open(str(result.router_path), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["capacity_loss"] == "linear"


# -- resume and determinism ----------------------------------------------------------------------------------------


def test_resume_reaches_the_same_routers_and_runs_are_deterministic(tmp_path):
    tok, data, rc = tiny_tokenizer(), conversations(16), RouterConfig(num_layers=3, level="token")
    full = tiny_model("llama")
    train_routers(full, tok, data, rc, _config(tmp_path, "full", epochs=2, save_every=1))
    again = tiny_model("llama")
    train_routers(again, tok, data, rc, _config(tmp_path, "again", epochs=2))
    assert all(torch.equal(a, b) for a, b in zip(_routers(full).values(), _routers(again).values()))

    cfg = _config(tmp_path, "resumed", epochs=2, save_every=1)
    first = train_routers(tiny_model("llama"), tok, data, rc, cfg, stop_after=3)
    assert not first.completed and first.steps == 3
    with pytest.raises(ValueError, match="resume=True"):
        train_routers(tiny_model("llama"), tok, data, rc, cfg)
    # a fresh model, and a changed trajectory setting that the checkpoint overrides
    resumed_model = tiny_model("llama")
    result = train_routers(resumed_model, tok, data, rc, TrainConfig(**{**cfg.to_dict(), "learning_rate": 1.0}), resume=True)
    assert result.completed and [r["step"] for r in result.history] == [4]
    assert all(torch.equal(a, b) for a, b in zip(_routers(full).values(), _routers(resumed_model).values()))
    rows = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


# -- calibration ---------------------------------------------------------------------------------------------------


def _random_batch(seed, B, T=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[: B // 2, : T // 3] = 0  # some left padding
    return {"input_ids": ids, "attention_mask": mask}


def _executed(model, batches) -> dict[int, float]:
    counts = {}
    with torch.no_grad():
        for b in batches:
            for layer, (e, t) in model(**b).routing.counts().items():
                c = counts.setdefault(layer, [0.0, 0.0])
                c[0], c[1] = c[0] + e, c[1] + t
    return {layer: e / t for layer, (e, t) in counts.items()}


def _random_routers(model, level):
    attach_routers(model, RouterConfig(num_layers=3, level=level))
    g = torch.Generator().manual_seed(3)
    for p in router_parameters(model):
        p.data = torch.randn(p.shape, generator=g)
    return model


@pytest.mark.parametrize("capacity", [0.3, 0.75])
def test_calibration_hits_the_capacity_per_layer_token_level(capacity):
    model = _random_routers(tiny_model("llama"), "token")
    calib = [_random_batch(1, 8), _random_batch(2, 8)]
    thresholds = calibrate_thresholds(model, calib, capacity)
    assert set(thresholds) == {2, 3, 4}
    # each threshold lies midway between the k-th and (k+1)-th largest of its layer's real-token scores (the layers
    # before it already at their new thresholds, as they are now)
    with torch.no_grad():
        decisions = [d for b in calib for d in model(**b, use_cache=False).routing.decisions]
    for i, t in thresholds.items():
        s = torch.cat([d.score[d.weight.bool()] for d in decisions if d.layer == i]).sort(descending=True).values
        k = round(capacity * len(s))
        assert t == pytest.approx(float(s[k - 1] + s[k]) / 2)
    n = sum(int(b["attention_mask"].sum()) for b in calib)
    for fraction in _executed(model, calib).values():  # exact on the calibration data
        assert fraction == pytest.approx(round(capacity * n) / n, abs=1e-9)
    for fraction in _executed(model, [_random_batch(7, 16)]).values():  # held out
        assert abs(fraction - capacity) <= 0.1


def _layer_by_layer(model, batches, capacity) -> dict[int, float]:
    """The reference per-layer calibration: layers in order, each from its scores on a full pass over every batch
    with the layers before it at their new thresholds (one pass per routed layer)."""
    thresholds = {}
    for i in routed_layers(model):
        thresholds[i] = threshold_for(_router_scores(model, "real", batches)[i], capacity)
        set_thresholds(model, {i: thresholds[i]})
    return thresholds


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("target, level", [("attn", "sequence"), ("block", "token"), ("mlp", "token")])
def test_per_layer_calibration_in_one_forward_equals_layer_by_layer(arch, target, level):
    """Two left-padded batches of different lengths run as one right-extended batch: the thresholds equal those of
    one pass per layer over the batches as given, and the model is left at them."""
    calib = [_random_batch(1, 6), _random_batch(2, 5, T=16)]
    found = {}
    for how in ("one forward", "layer by layer"):
        model = attach_routers(tiny_model(arch), RouterConfig(target=target, level=level, num_layers=3))
        g = torch.Generator().manual_seed(3)
        for p in router_parameters(model):
            p.data = torch.randn(p.shape, generator=g)
        found[how] = (calibrate_thresholds(model, calib, 0.4) if how == "one forward"
                      else _layer_by_layer(model, calib, 0.4))
        assert {i: layer.routing.threshold for i, layer in routed_layers(model).items()} == found[how]
    assert found["one forward"] == pytest.approx(found["layer by layer"], abs=1e-6)


def test_calibration_sequence_level_and_global_threshold(tmp_path):
    model = _random_routers(tiny_model("mistral"), "sequence")
    calib = [_random_batch(1, 10), _random_batch(2, 10)]
    calibrate_thresholds(model, calib, 0.5)
    assert all(f == 0.5 for f in _executed(model, calib).values())

    set_thresholds(model, 0.5)
    thresholds = calibrate_thresholds(model, calib, 0.4, per_layer=False)
    assert len(set(thresholds.values())) == 1
    fractions = _executed(model, calib)
    assert abs(sum(fractions.values()) / len(fractions) - 0.4) <= 0.15


def test_calibration_on_conversations_with_a_tokenizer():
    model = _random_routers(tiny_model("llama"), "token")
    thresholds = calibrate_thresholds(model, conversations(12), 0.5, tokenizer=tiny_tokenizer(), batch_size=4)
    assert set(thresholds) == {2, 3, 4}


def test_calibration_on_plain_texts_matches_the_same_tokens_as_batches():
    """Texts are tokenized as an evaluation encodes a context, right padded; scoring them equals scoring the batch."""
    tok = tiny_tokenizer()
    texts = ["Question: a b c\nAnswer:", "short", "Question: a much longer question about things\nAnswer:"] * 4
    model = _random_routers(tiny_model("llama"), "sequence")
    t_texts = calibrate_thresholds(model, texts, 0.5, tokenizer=tok, batch_size=4)
    enc = [tok(t)["input_ids"] for t in texts]
    batches = []
    for i in range(0, len(enc), 4):
        rows = enc[i : i + 4]
        T = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        batches.append({"input_ids": ids, "attention_mask": mask})
    assert calibrate_thresholds(model, batches, 0.5) == pytest.approx(t_texts)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibrate_thresholds(model, texts, 0.5)


def test_calibration_rejects_texts_without_tokens():
    model = _random_routers(tiny_model("llama"), "sequence")
    with pytest.raises(ValueError, match=r"calibration texts \[1\] have no tokens \(e.g. ''\)"):
        calibrate_thresholds(model, ["abc", ""], 0.5, tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("row", [{"instruction": "add", "input": "2+2", "output": "4"}, "just a text"])
def test_training_on_rows_that_are_not_conversations_says_what_to_use(tmp_path, row):
    rows = conversations(7) + [row]
    with pytest.raises(ValueError, match="row 7 is not a conversation .*load_instruction_data"):
        train_routers(tiny_model("llama"), tiny_tokenizer(), rows, RouterConfig(num_layers=2), _config(tmp_path))


def test_a_second_training_in_one_process_may_change_mixed_precision(tmp_path):
    for precision in ("bf16", "no"):
        model = tiny_model("llama")
        result = train_routers(model, tiny_tokenizer(), conversations(8), RouterConfig(num_layers=2),
                               _config(tmp_path, precision, mixed_precision=precision))
        assert result.completed


def test_a_second_bf16_training_of_the_same_model_runs_under_autocast(tmp_path):
    """A bf16 backbone with float32 routers needs autocast in every training; accelerate's ``prepare`` skips a model
    it has prepared before, so the second training ran without it (notebook 01's second granularity failed in the
    paper check). The model's own ``forward`` is back after each training, unmarked."""
    model = tiny_model("llama").to(torch.bfloat16)
    for run in ("first", "second"):
        result = train_routers(model, tiny_tokenizer(), conversations(8), RouterConfig(num_layers=2),
                               _config(tmp_path, run, mixed_precision="bf16"))
        assert result.completed and result.model is model
        assert not vars(model).keys() & {"forward", "_original_forward", "_is_accelerate_prepared"}
        detach_routers(model)


# -- multi-process ---------------------------------------------------------------------------------------------------


def test_two_processes_reach_the_same_routers_as_one(tmp_path):
    script = Path(__file__).with_name("_two_process_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}  # gloo
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*cmd, str(script), str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "global batch 8 = 2 processes x 2 accumulation x 2" in proc.stderr
    two = load_file(str(tmp_path / "two" / "routers.safetensors"))

    model = tiny_model("llama")
    train_routers(model, tiny_tokenizer(), conversations(16), RouterConfig(num_layers=3), _config(tmp_path, "one"))
    one = load_file(str(tmp_path / "one" / "routers.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    assert not all(torch.equal(v, torch.zeros_like(v)) for v in one.values())


# -- the real model's chat template ----------------------------------------------------------------------------------


@pytest.mark.model
def test_assistant_masking_on_smollm2_template():
    from routertune_lib.models import load_model

    _, tok = load_model("smollm2-135m")
    conv = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]}
    (row,) = tokenize_conversations(tok, [conv], max_length=2048)
    labelled = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert labelled == "It is 4.<|im_end|>\nSix.<|im_end|>\n"
