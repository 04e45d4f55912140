"""Routers: config validation, zero routers == dense, real == masked (logits and generations), real skipping and
KV-cache compaction, checkpoints."""

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import CONFIGS, left_padded_batch, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from routertune_lib.routing import (
    MODES,
    RouterConfig,
    RoutingContext,
    RoutingTrace,
    attach_routers,
    detach_routers,
    load_routers,
    routed_layers,
    router_parameters,
    routing_mode,
    save_routers,
    set_thresholds,
)
from routertune_lib.routing.layer import RoutedLayerMixin
from routertune_lib.speed import kv_cache_bytes
from routertune_lib.training import calibrate_thresholds

GRANULARITIES = list(itertools.product(("attn", "mlp", "block"), ("sequence", "token")))


def mixed_routers(model, ids, mask, seed=0):
    """Random router weights, then per-layer thresholds that split the batch's decisions: every routed layer keeps
    about two thirds of its inputs, in prefill and over the decode steps of a greedy generate (both asserted)."""
    g = torch.Generator().manual_seed(seed)
    layers = routed_layers(model)
    for layer in layers.values():
        layer.router.weight.data = torch.randn(layer.router.weight.shape, generator=g)
    # Rescale each router so its largest real-token logit is 8: the hidden states of a real model (Gemma-3's reach
    # norms in the thousands) would otherwise saturate the sigmoid, and tied scores of 1.0 cannot be split.
    largest = {}
    hooks = [
        layer.router.register_forward_hook(
            lambda module, args, out, i=i: largest.__setitem__(i, float(out.squeeze(-1)[mask.bool()].abs().max()))
        )
        for i, layer in layers.items()
    ]
    with torch.no_grad(), routing_mode(model, "masked"):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in hooks:
        h.remove()
    for i, layer in layers.items():
        layer.router.weight.data *= 8.0 / max(largest[i], 1e-6)
    calibrate_thresholds(model, [{"input_ids": ids, "attention_mask": mask}], 2 / 3)
    with torch.no_grad():
        trace = model(input_ids=ids, attention_mask=mask, use_cache=False).routing
    fractions = trace.executed_fraction()
    assert all(0 < f < 1 for f in fractions.values()), f"prefill: not every routed layer is mixed: {fractions}"
    steps = generation_traces(model, ids, mask, max_new_tokens=6)
    decode = {i: [] for i in fractions}
    for trace in steps[1:]:
        for d in trace.decisions:
            decode[d.layer].append(d.keep[d.weight.bool()].flatten())
    decode = {i: float(torch.cat(k).mean()) for i, k in decode.items()}
    assert all(0 < f < 1 for f in decode.values()), f"decode: not every routed layer is mixed: {decode}"
    return fractions


def generation_traces(model, ids, mask, **generate_kwargs):
    """The ``RoutingTrace`` of each forward of a greedy ``generate`` (prefill first, then one per decode step)."""
    traces = []
    handle = model.register_forward_hook(lambda module, args, output: traces.append(output.routing))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **generate_kwargs)
    handle.remove()
    return traces


def real_positions(logits, mask):
    return logits[mask.bool()]


# -- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target="ffn"), "target must be one of"),
        (dict(level="batch"), "level must be one of"),
        (dict(threshold=1.5), r"threshold must be in \[0, 1\]"),
        (dict(capacity=0.0), r"capacity must be in \(0, 1\]"),
        (dict(capacity_weight=-1), "capacity_weight must be >= 0"),
        (dict(num_layers=0), "num_layers must be an integer >= 1"),
        (dict(num_layers=2, layers=[1]), "either num_layers or layers"),
        (dict(layers=[1, 1]), "duplicates"),
        (dict(capacity_weight=float("nan")), "capacity_weight must be a finite number"),
        (dict(capacity_weight=float("inf")), "capacity_weight must be a finite number"),
        (dict(capacity=float("nan")), "capacity must be a finite number"),
        (dict(threshold="0.5"), "threshold must be a finite number, got '0.5'"),
        (dict(threshold=True), "threshold must be a finite number, got True"),
        (dict(num_layers=True), "num_layers must be an integer >= 1, got True"),
        (dict(num_layers=2.0), "num_layers must be an integer >= 1, got 2.0"),
        (dict(layers=[True, 2]), r"layers .* must be a non-negative integer, got True"),
        (dict(layers="12"), "layers must be a non-empty list"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kwargs)


def test_config_accepts_numpy_and_tensor_scalars_as_plain_numbers(tmp_path):
    config = RouterConfig(threshold=np.float32(0.25), capacity=torch.tensor(0.5), num_layers=np.int64(2))
    assert (type(config.threshold), type(config.capacity), type(config.num_layers)) == (float, float, int)
    assert RouterConfig(layers=[np.int64(3), 1]).layers == [1, 3]
    model = tiny_model()
    attach_routers(model, config)
    path = save_routers(model, tmp_path / "r.safetensors")  # was: float32 is not JSON serializable
    fresh = load_routers(tiny_model(), path)
    assert {i: l.routing.threshold for i, l in routed_layers(fresh).items()} == {3: 0.25, 4: 0.25}


def test_set_thresholds_accepts_json_round_trip_and_scalars_and_rejects_unrouted_layers():
    model = tiny_model()
    attach_routers(model, RouterConfig(layers=[2, 4]))

    def thresholds():
        return {i: layer.routing.threshold for i, layer in routed_layers(model).items()}

    set_thresholds(model, json.loads(json.dumps({2: 0.7, 4: 0.2})))  # keys become '2', '4'
    assert thresholds() == {2: 0.7, 4: 0.2}
    set_thresholds(model, {np.int64(4): np.float32(0.25)})
    assert thresholds() == {2: 0.7, 4: 0.25}
    set_thresholds(model, torch.tensor(0.125))
    assert thresholds() == {2: 0.125, 4: 0.125}
    set_thresholds(model, np.float64(0.375))
    assert thresholds() == {2: 0.375, 4: 0.375}
    for bad, message in [
        ({99: 0.7}, r"layers \[99\], which are not routed; routed layers: \[2, 4\]"),
        ({"3": 0.7, 2: 0.1}, r"layers \[3\], which are not routed"),
        ({"two": 0.7}, "layer key must be a non-negative integer, got 'two'"),
        ({2: "0.5"}, "threshold for layer 2 must be a finite number, got '0.5'"),
        ({2: 1.5}, r"threshold for layer 2 must be in \[0, 1\], got 1.5"),
        ("0.5", "threshold must be a finite number, got '0.5'"),
        (float("nan"), "threshold must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=message):
            set_thresholds(model, bad)
    assert thresholds() == {2: 0.375, 4: 0.375}  # a rejected call changes nothing


def test_routed_layers_are_the_deepest_except_the_last():
    assert RouterConfig(num_layers=16).resolve_layers(32) == list(range(15, 31))
    assert RouterConfig().resolve_layers(30) == list(range(14, 29))
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 5\]"):
        RouterConfig(num_layers=6).resolve_layers(6)
    with pytest.raises(ValueError, match="out of range"):
        RouterConfig(layers=[7]).resolve_layers(6)


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Supported model types"):
        attach_routers(gpt2, RouterConfig())


def test_router_is_zero_initialised_and_adds_only_router_keys():
    model = tiny_model()
    before = set(model.state_dict())
    attach_routers(model, RouterConfig(num_layers=3))
    added = set(model.state_dict()) - before
    assert added == {f"model.layers.{i}.router.weight" for i in (2, 3, 4)}
    assert all(layer.router.weight.abs().sum() == 0 for layer in routed_layers(model).values())
    with pytest.raises(ValueError, match="already has routers"):
        attach_routers(model, RouterConfig())
    detach_routers(model)
    assert set(model.state_dict()) == before


# -- equivalences ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("target, level", GRANULARITIES)
def test_zero_routers_equal_dense(arch, target, level, batch):
    ids, mask = batch
    model = tiny_model(arch)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        dense_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    attach_routers(model, RouterConfig(target=target, level=level, num_layers=4))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(real_positions(out.logits, mask), real_positions(dense, mask), rtol=1e-5, atol=1e-5)
    assert all(f == 1.0 for f in out.routing.executed_fraction().values())
    assert torch.equal(gen, dense_gen)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("target, level", GRANULARITIES)
def test_real_equals_masked_with_mixed_decisions(arch, target, level, attn_implementation):
    ids, mask = left_padded_batch()
    model = tiny_model(arch, attn_implementation)
    attach_routers(model, RouterConfig(target=target, level=level, num_layers=4))
    mixed_routers(model, ids, mask)
    with torch.no_grad():
        with routing_mode(model, "masked"):
            ref = model(input_ids=ids, attention_mask=mask)
            ref_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        real = model(input_ids=ids, attention_mask=mask)
        real_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(real_positions(real.logits, mask), real_positions(ref.logits, mask), rtol=1e-4, atol=1e-5)
    assert real.routing.executed_fraction() == ref.routing.executed_fraction()
    assert torch.equal(real_gen, ref_gen)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("target, level", GRANULARITIES)
def test_real_equals_masked_without_padding_and_batch_one(arch, target, level):
    ids, mask = left_padded_batch(lengths=(8, 8))
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(target=target, level=level, num_layers=4))
    mixed_routers(model, ids, mask)
    for rows in (slice(0, 2), slice(0, 1)):
        with torch.no_grad():
            with routing_mode(model, "masked"):
                ref = model(input_ids=ids[rows]).logits
                ref_gen = model.generate(input_ids=ids[rows], max_new_tokens=5, do_sample=False)
            real = model(input_ids=ids[rows]).logits
            real_gen = model.generate(input_ids=ids[rows], max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(real, ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(real_gen, ref_gen)


# -- real skipping ----------------------------------------------------------------------------------------------


def count_rows(module, log):
    """Record the number of rows (batch entries x tokens) each call of ``module`` receives."""

    def hook(mod, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        log.append(x.shape[:-1].numel())

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("target, level", GRANULARITIES)
def test_real_mode_does_not_run_skipped_work(target, level):
    ids, mask = left_padded_batch(lengths=(8, 8, 8))
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(target=target, level=level, num_layers=4))
    fractions = mixed_routers(model, ids, mask)
    layer_idx = next(i for i, f in fractions.items() if 0 < f < 1)
    layer = routed_layers(model)[layer_idx]
    module = layer.mlp if target == "mlp" else layer.self_attn
    counted = {}
    for mode in ("masked", "real"):
        log = []
        handle = count_rows(layer.mlp if target == "mlp" else layer.self_attn, log)
        if target == "block":
            handle2 = count_rows(layer.mlp, log)
        with torch.no_grad(), routing_mode(model, mode):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        handle.remove()
        if target == "block":
            handle2.remove()
        counted[mode] = sum(log)
    total = ids.numel() * (2 if target == "block" else 1)
    assert counted["masked"] == total
    if level == "token" and target != "mlp":
        # token-level attention bypasses the module's forward: its projections run on the kept tokens only
        q_rows = []
        h = module.q_proj.register_forward_pre_hook(lambda m, a: q_rows.append(a[0].shape[:-1].numel()))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        h.remove()
        assert sum(q_rows) < ids.numel()
    else:
        assert counted["real"] < total
        kept = round(fractions[layer_idx] * (ids.shape[0] if level == "sequence" else ids.numel()))
        per_unit = ids.shape[1] if level == "sequence" else 1
        assert counted["real"] == kept * per_unit * (2 if target == "block" else 1)


SEQUENCE_TARGETS = ["attn", "mlp", "block"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("target", SEQUENCE_TARGETS)
def test_each_padded_row_routes_as_it_does_alone(arch, target):
    """Padding does not count in a row's sequence score: scores and decisions in a left-padded batch equal the row's
    own, run without padding."""
    ids, mask = left_padded_batch()
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(target=target, level="sequence", num_layers=4))
    mixed_routers(model, ids, mask)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, use_cache=False).routing.decisions
        for b in range(ids.shape[0]):
            alone = model(input_ids=ids[b : b + 1, mask[b].bool()], use_cache=False).routing.decisions
            for d, a in zip(batch, alone, strict=True):
                torch.testing.assert_close(d.score[b : b + 1], a.score, rtol=1e-5, atol=1e-6)
                assert torch.equal(d.keep[b : b + 1], a.keep), (b, d.layer)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("target", SEQUENCE_TARGETS)
def test_every_decode_step_keeps_the_prefill_decision(arch, target):
    ids, mask = left_padded_batch()
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(target=target, level="sequence", num_layers=4))
    mixed_routers(model, ids, mask)
    prefill, *steps = generation_traces(model, ids, mask, max_new_tokens=6)
    assert len(steps) == 5
    decided = {d.layer: d.keep for d in prefill.decisions}
    assert all(d.score is not None for d in prefill.decisions)
    for trace in steps:
        assert {d.layer for d in trace.decisions} == decided.keys()
        for d in trace.decisions:
            assert d.score is None, f"layer {d.layer} re-decided at a decode step"  # reused from the cache
            assert torch.equal(d.keep, decided[d.layer])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("target", ["attn", "block"])
def test_token_level_decode_steps_with_mixed_rows_run_the_plain_attention(arch, target, monkeypatch):
    """At a decode step where some rows keep their token, token-level attention runs the module's own attention
    with skipped rows' output zeroed (no gathers), and generation still equals masked."""
    ids, mask = left_padded_batch()
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(target=target, level="token", num_layers=4))
    mixed_routers(model, ids, mask)
    gathered, mixed_steps = [], []
    kept_tokens_path = RoutedLayerMixin._attn_delta_for_tokens
    step = RoutedLayerMixin._attention_step

    def record_step(self, h, x, gate, *args):
        if h.shape[1] == 1 and gate is not None and 0 < int(gate.bool().sum()) < h.shape[0]:
            mixed_steps.append(self.routing.layer_idx)
        return step(self, h, x, gate, *args)

    monkeypatch.setattr(RoutedLayerMixin, "_attn_delta_for_tokens",
                        lambda self, x, keep, *a: gathered.append((x.shape[1], bool(keep.any())))
                        or kept_tokens_path(self, x, keep, *a))
    monkeypatch.setattr(RoutedLayerMixin, "_attention_step", record_step)
    with torch.no_grad():
        with routing_mode(model, "masked"):
            ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        real = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert mixed_steps, "no decode step had both kept and skipped rows"
    # the kept-token path ran for prompts, and at decode steps only where every row skips (K/V written, nothing else)
    assert gathered and all(t > 1 or not kept for t, kept in gathered)
    assert torch.equal(real, ref)


@pytest.mark.parametrize("target", ["attn", "mlp", "block"])
def test_padding_tokens_never_run_at_token_level(target):
    """Zero routers keep every real token: decisions at padding are 0, and in real mode the MLP receives exactly the
    real tokens (attention computes K/V for every token by design, so its row count cannot tell)."""
    ids, mask = left_padded_batch()
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(target=target, level="token", num_layers=4))
    real = mask.bool()
    assert int(real.sum()) < ids.numel()
    mlp_rows = {}
    handles = [count_rows(layer.mlp, mlp_rows.setdefault(i, [])) for i, layer in routed_layers(model).items()]
    with torch.no_grad():
        trace = model(input_ids=ids, attention_mask=mask, use_cache=False).routing
    for h in handles:
        h.remove()
    for d in trace.decisions:
        assert torch.equal(d.keep.bool(), real) and torch.equal(d.weight.bool(), real), d.layer
    expected = [int(real.sum())] if target in ("mlp", "block") else [ids.numel()]
    assert all(rows == expected for rows in mlp_rows.values()), mlp_rows


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sequence_level_attention_skipping_shrinks_the_kv_cache(arch):
    ids, mask = left_padded_batch(lengths=(8, 8, 8, 8))
    model = tiny_model(arch)
    with torch.no_grad():
        dense_cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
    attach_routers(model, RouterConfig(target="attn", level="sequence", num_layers=4))
    fractions = mixed_routers(model, ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        with routing_mode(model, "masked"):
            masked_cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
    layers = len(model.model.layers)
    skipped_fraction = sum(1 - f for f in fractions.values()) / layers
    assert kv_cache_bytes(masked_cache) == kv_cache_bytes(dense_cache)
    assert kv_cache_bytes(out.cache) == pytest.approx(kv_cache_bytes(dense_cache) * (1 - skipped_fraction))
    assert kv_cache_bytes(out.cache) < kv_cache_bytes(dense_cache)


def test_layer_skipped_by_every_sequence_holds_no_cache_and_generation_continues():
    ids, mask = left_padded_batch(lengths=(6, 4))
    model = tiny_model("gemma3")  # layer 0 is the first sliding layer, layer 1 the first full one: both routed
    attach_routers(model, RouterConfig(target="attn", level="sequence", layers=[0, 1, 3]))
    set_thresholds(model, 0.6)  # zero routers score 0.5 < 0.6: every sequence skips every routed layer
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with routing_mode(model, "masked"):
            ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for i in (0, 1, 3):
        assert out.cache.layers[i].keys.numel() == 0
    assert out.cache.get_seq_length() == ids.shape[1]
    assert torch.equal(gen, ref)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("target", ["attn", "block"])
def test_sequence_level_decode_steps_launch_no_decision_work(arch, target):
    """A decode step reuses the decision stored at prefill as it is (the same tensors every step, no conversion),
    and a layer that every row skips computes nothing, not even its input norm; generation equals masked."""
    ids, mask = left_padded_batch(lengths=(6, 4))
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(target=target, level="sequence", layers=[0, 1, 3]))
    layers = routed_layers(model)
    set_thresholds(model, {0: 0.6, 1: 0.4, 3: 0.6})  # zero routers score 0.5: layers 0 and 3 skipped by every row
    norm_calls = {i: 0 for i in layers}
    hooks = [layer.get_submodule(layer.routing.arch.pre_attn_norm).register_forward_hook(
        lambda m, a, o, i=i: norm_calls.__setitem__(i, norm_calls[i] + 1)) for i, layer in layers.items()]
    steps = dict(max_new_tokens=5, min_new_tokens=5)  # tiny random models may end on EOS at once
    prefill, *decode = generation_traces(model, ids, mask, **steps)
    for h in hooks:
        h.remove()
    assert len(decode) == 4
    assert norm_calls == {0: 1, 1: 5, 3: 1}  # the prefill's routers need the norm, skipped decode steps do not
    first = {d.layer: (d.keep, d.weight) for d in decode[0].decisions}
    for trace in decode:
        for d in trace.decisions:
            assert d.keep is first[d.layer][0] and d.weight is first[d.layer][1], d.layer
    assert torch.equal(first[1][0], torch.ones(2)) and torch.equal(first[0][0], torch.zeros(2))
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **steps)
        with routing_mode(model, "masked"):
            ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **steps)
    assert torch.equal(gen, ref)


# -- training semantics ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, level", GRANULARITIES)
def test_straight_through_gradient_reaches_zero_routers(target, level, batch):
    ids, mask = batch
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    attach_routers(model, RouterConfig(target=target, level=level, num_layers=3))
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    assert out.routing.capacity().item() == 1.0
    out.loss.backward()
    for layer in routed_layers(model).values():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("training_forward", MODES)
@pytest.mark.parametrize("target, level", GRANULARITIES)
def test_router_gradient_by_training_forward_and_skipped_inputs(target, level, training_forward, batch):
    """Both training forwards compute the inference logits of their mode and pass the straight-through gradient to the
    router through kept inputs; with ``real`` a skipped input's layer output does not depend on the router at all (no
    task-loss gradient), with ``masked`` it does (its sub-layer output times a 0 that carries the gradient)."""
    ids, mask = batch
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    attach_routers(model, RouterConfig(target=target, level=level, layers=[3]))
    mixed_routers(model, ids, mask)
    layer = routed_layers(model)[3]
    outputs = []
    hook = layer.register_forward_hook(lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    ctx = RoutingContext(training_forward, mask, RoutingTrace(), training_forward=training_forward)
    logits = model(input_ids=ids, attention_mask=mask, routing_context=ctx, use_cache=False).logits
    hook.remove()
    with torch.no_grad(), routing_mode(model, training_forward):  # the straight-through factor is 1 in value
        assert torch.allclose(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, logits, atol=1e-5)
    (d,) = ctx.trace.decisions
    keep = d.keep.detach().bool() if level == "token" else d.keep.detach().bool()[:, None].expand(mask.shape)
    real = mask.bool()
    out = outputs[0]  # [B, T, d] the routed layer's output
    assert (keep & real).any() and (~keep & real).any()

    def router_grad(positions):
        (g,) = torch.autograd.grad(out[positions].sum(), layer.router.weight, retain_graph=True, allow_unused=True)
        return torch.zeros_like(layer.router.weight) if g is None else g

    assert router_grad(keep & real).abs().sum() > 0
    skipped = router_grad(~keep & real).abs().sum()
    assert skipped == 0 if training_forward == "real" else skipped > 0


def test_routing_context_rejects_unknown_modes():
    with pytest.raises(ValueError, match="training_forward must be one of .*'soft'"):
        RoutingContext("real", None, RoutingTrace(), training_forward="soft")


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_router_bias_option(level, batch, tmp_path):
    ids, mask = batch
    with torch.no_grad():
        ref = tiny_model("llama")(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(ValueError, match="router_bias must be True or False"):
        RouterConfig(router_bias="yes")
    model = attach_routers(tiny_model("llama"), RouterConfig(level=level, num_layers=3, router_bias=True))
    layers = routed_layers(model)
    assert len(router_parameters(model)) == 6 and all(layer.router.bias.item() == 0 for layer in layers.values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)  # zero routers: dense
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    out.loss.backward()
    assert all(layer.router.bias.grad.abs().sum() > 0 for layer in layers.values())

    layers[3].router.bias.data.fill_(-1.0)  # the bias alone moves a whole layer below the threshold
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert out.routing.executed_fraction() == {2: 1.0, 3: 0.0, 4: 1.0}
    fresh = load_routers(tiny_model("llama"), save_routers(model, tmp_path / "routers.safetensors"))
    assert torch.equal(routed_layers(fresh)[3].router.bias, layers[3].router.bias.detach())
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, out.logits)


# -- checkpoints ---------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, batch):
    ids, mask = batch
    model = tiny_model("qwen2")
    attach_routers(model, RouterConfig(target="block", level="token", num_layers=3))
    mixed_routers(model, ids, mask)
    path = save_routers(model, tmp_path / "routers.safetensors")
    assert path.stat().st_size < 10_000
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    fresh = tiny_model("qwen2")
    load_routers(fresh, path)
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected)


def test_save_routers_to_a_directory_fails_clearly_and_leaves_nothing(tmp_path):
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(num_layers=2))
    with pytest.raises(ValueError, match=r"is a directory; pass a file path such as .*routers\.safetensors"):
        save_routers(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_leaves_no_temporary_file_when_the_rename_fails(tmp_path):
    from routertune_lib.reporting import write_atomic

    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "taken", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_loading_a_checkpoint_into_another_model_fails(tmp_path):
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(num_layers=2))
    path = save_routers(model, tmp_path / "r.safetensors")
    other = tiny_model("gemma3")
    with pytest.raises(ValueError, match="trained for another model"):
        load_routers(other, path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a router checkpoint"):
        load_routers(tiny_model("llama"), junk)


# -- the bundled pretrained models ---------------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("target, level", [("attn", "sequence"), ("block", "token")])
def test_real_equals_masked_on_bundled_models(name, target, level):
    from routertune_lib.models import load_model

    model, tokenizer = load_model(name, device="cpu")
    prompts = ["The capital of France is", "Water boils at a temperature of", "Once upon a time"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    attach_routers(model, RouterConfig(target=target, level=level, num_layers=6))
    mixed_routers(model, ids, mask)
    with torch.no_grad():
        with routing_mode(model, "masked"):
            ref = model(input_ids=ids, attention_mask=mask).logits
            ref_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        real = model(input_ids=ids, attention_mask=mask).logits
        real_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(real_positions(real, mask), real_positions(ref, mask), rtol=1e-4, atol=1e-4)
    assert torch.equal(real_gen, ref_gen)


# -- caches ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["attn", "mlp", "block"])
def test_generate_without_cache_refuses_sequence_routing(target, batch):
    ids, mask = batch
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(target=target, level="sequence", num_layers=4))
    mixed_routers(model, ids, mask)
    with pytest.raises(ValueError, match=r"use_cache=False\) is not supported with sequence-level routers"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    model.generation_config.use_cache = False
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    detach_routers(model)
    assert "generate" not in vars(model)


@pytest.mark.parametrize("target", ["attn", "mlp", "block"])
def test_token_routing_generates_the_same_with_and_without_cache(target, batch):
    ids, mask = batch
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(target=target, level="token", num_layers=4))
    mixed_routers(model, ids, mask)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize(
    "arch, level, cache_implementation",
    [("llama", "sequence", "static"), ("llama", "token", "static"), ("gemma3", "sequence", "static"),
     ("gemma3", "token", "static"), ("llama", "sequence", "offloaded")],
)
def test_unsupported_caches_are_named(arch, level, cache_implementation, batch):
    ids, mask = batch
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(target="attn", level=level, num_layers=3))  # zero routers
    with pytest.raises(ValueError, match="support only a DynamicCache .*cache_implementation='dynamic'"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       cache_implementation=cache_implementation)


# -- saving the whole routed model ---------------------------------------------------------------------------------


def save_with_tokenizer(model, path):
    """``save_pretrained`` the model with a two-token tokenizer, so ``models.load_model`` can read the directory."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        pad_token="<pad>", unk_token="<unk>")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def routing_state(model):
    return model.routertune.config, model.routertune.static, {
        i: (layer.routing.threshold, None if layer.router is None else layer.router.weight.detach().clone())
        for i, layer in routed_layers(model).items()
    }


@pytest.mark.parametrize("arch, target, level", [("llama", "attn", "sequence"), ("gemma3", "block", "token")])
def test_save_pretrained_round_trips_through_load_model(tmp_path, arch, target, level, batch):
    from routertune_lib.models import load_model

    ids, mask = batch
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(target=target, level=level, num_layers=4))
    mixed_routers(model, ids, mask)  # random weights, a different threshold per layer
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
        expected_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    loaded, _ = load_model(str(save_with_tokenizer(model, tmp_path / "m")), device="cpu", dtype="float32")
    config, static, layers = routing_state(model)
    got_config, got_static, got_layers = routing_state(loaded)
    assert (got_config, got_static) == (config, static)
    assert got_layers.keys() == layers.keys()
    for i, (threshold, weight) in layers.items():
        assert got_layers[i][0] == threshold and torch.equal(got_layers[i][1], weight)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask)
        got_gen = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(real_positions(got.logits, mask), real_positions(expected.logits, mask))
    assert got.routing.executed_fraction() == expected.routing.executed_fraction()
    assert torch.equal(got_gen, expected_gen)
    detach_routers(loaded)
    assert not hasattr(loaded.config, "routertune")


def test_static_drop_round_trips_and_missing_router_weights_are_named(tmp_path, batch):
    from safetensors.torch import load_file, save_file

    from routertune_lib.models import load_model

    dropped = attach_routers(tiny_model(), RouterConfig(layers=[1, 3]), static_drop=True)
    loaded, _ = load_model(str(save_with_tokenizer(dropped, tmp_path / "drop")), device="cpu", dtype="float32")
    assert loaded.routertune.static and loaded.routertune.layers == [1, 3]

    routed = attach_routers(tiny_model(), RouterConfig(layers=[1, 3]))
    path = save_with_tokenizer(routed, tmp_path / "routed")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.3.router.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack \['model.layers.3.router.weight'\]"):
        load_model(str(path), device="cpu", dtype="float32")


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_torch_save_of_a_routed_model_round_trips(tmp_path, level, batch):
    ids, mask = batch
    model = tiny_model("qwen2")
    attach_routers(model, RouterConfig(target="block", level=level, num_layers=3))
    mixed_routers(model, ids, mask)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        expected_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded.model.layers[3]) is type(model.model.layers[3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)
        assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False),
                           expected_gen)
    detach_routers(loaded)
    assert type(loaded.model.layers[3]).__name__ == "Qwen2DecoderLayer"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("target", ["attn", "block"])
def test_token_level_decode_step_every_row_skips_writes_only_keys_and_values(arch, target, monkeypatch):
    """At batch 1 every decode step is all-or-nothing; a skipped step writes its K/V (later tokens see it) and runs
    nothing else: no queries, no kept-token path. Generation equals masked, and the cache holds every position."""
    ids, mask = left_padded_batch()
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(target=target, level="token", num_layers=4))
    mixed_routers(model, ids, mask)
    one, one_mask = ids[-1:], mask[-1:]  # a single prompt: its decode steps are kept or skipped whole
    kv_only, gathered = [], []
    keys_values, kept_tokens_path = RoutedLayerMixin._keys_values, RoutedLayerMixin._attn_delta_for_tokens
    monkeypatch.setattr(RoutedLayerMixin, "_keys_values",
                        lambda self, x, kw: kv_only.append(x.shape[1]) or keys_values(self, x, kw))
    monkeypatch.setattr(RoutedLayerMixin, "_attn_delta_for_tokens",
                        lambda self, x, *a: gathered.append(x.shape[1]) or kept_tokens_path(self, x, *a))
    with torch.no_grad():
        with routing_mode(model, "masked"):
            ref = model.generate(input_ids=one, attention_mask=one_mask, max_new_tokens=8, do_sample=False)
        out = model.generate(input_ids=one, attention_mask=one_mask, max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    skipped_steps = [t for t in kv_only if t == 1]
    assert skipped_steps, "no decode step skipped a routed layer's attention"
    assert all(t > 1 for t in gathered)  # the kept-token path ran for the prompt only
    assert len(kv_only) - len(skipped_steps) == len(gathered)  # ... and found its keys there
    cache = out.past_key_values  # K/V of every position fed, in every layer (the skipped steps' included)
    assert all(cache.get_seq_length(i) == out.sequences.shape[1] - 1 for i in range(len(cache.layers)))
