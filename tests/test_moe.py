"""Expert routers for MoE blocks: zero routers == the original model, real == masked, experts run only on kept
tokens, load statistics add up to the gate's assignments, Expert Drop, training and checkpoints."""

import pytest
import torch
from _two_process_train import TRAIN, conversations, tiny_tokenizer
from conftest import left_padded_batch, tiny_model
from test_training import _layer_by_layer
from transformers import AutoConfig, AutoModelForCausalLM

from routertune_lib.evaluation import model_fingerprint
from routertune_lib.moe import (
    attach_expert_drop,
    expert_drop_plan,
    expert_router_config,
    expert_statistics,
    moe_layers,
    normalised_load,
    real_vs_masked,
)
from routertune_lib.routing import (
    RouterConfig,
    RoutingContext,
    RoutingTrace,
    attach_routers,
    detach_routers,
    load_routers,
    routed_layers,
    routing_mode,
    save_routers,
    set_thresholds,
)
from routertune_lib.training import TrainConfig, calibrate_thresholds, train_routers

TINY_MOE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                num_experts=8, num_local_experts=8, num_experts_per_tok=3, shared_expert_intermediate_size=32)
FAMILIES = ["olmoe", "qwen2_moe", "mixtral"]
IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]


def tiny_moe(family="olmoe", experts_implementation="eager", seed=0):
    """A tiny random MoE ``*ForCausalLM`` (8 experts, top-3), float32, eval mode."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **TINY_MOE)
    config._experts_implementation = experts_implementation
    return AutoModelForCausalLM.from_config(config, experts_implementation=experts_implementation).eval()


def random_expert_routers(model, ids, mask, keep_fraction=0.6, seed=0):
    """Gaussian router weights, then one threshold that keeps about ``keep_fraction`` of the batch's assignments."""
    g = torch.Generator().manual_seed(seed)
    for m in routed_layers(model).values():
        m.router.weight.data = torch.randn(m.router.weight.shape, generator=g)
    calibrate_thresholds(model, [{"input_ids": ids, "attention_mask": mask}], keep_fraction, per_layer=True)


def test_config_and_unsupported_models_fail_clearly():
    with pytest.raises(ValueError, match="level must be 'token'"):
        RouterConfig(target="experts", level="sequence")
    with pytest.raises(ValueError, match="not supported for model_type 'llama'.*olmoe"):
        attach_routers(tiny_model("llama"), RouterConfig(target="experts", level="token"))
    model = tiny_moe()
    with pytest.raises(ValueError, match="attach_expert_drop"):
        attach_routers(model, expert_router_config(model), static_drop=True)
    qwen = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2_moe", **TINY_MOE, mlp_only_layers=[1]))
    assert moe_layers(qwen) == [0, 2]
    with pytest.raises(ValueError, match=r"layers \[1\] .* no MoE experts module"):
        attach_routers(qwen, RouterConfig(target="experts", level="token", layers=[0, 1]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_routers_are_the_original_moe_model(family, implementation, batch):
    ids, mask = batch
    model = tiny_moe(family, implementation)
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    attach_routers(model, expert_router_config(model))
    assert set(model.state_dict()) - keys == {f"model.layers.{i}.mlp.experts.router.weight" for i in range(3)}
    assert keys <= set(model.state_dict())
    for mode in ("real", "masked"):
        with torch.no_grad(), routing_mode(model, mode):
            out = model(input_ids=ids, attention_mask=mask)
        assert torch.equal(out.logits[mask.bool()], ref[mask.bool()])  # bit for bit
        assert out.routing.capacity() == 1.0
    detach_routers(model)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_calibration_in_one_forward_equals_layer_by_layer(family, batch):
    """Expert routers calibrate in one forward (each layer from its real tokens' (token, expert) pairs) to the
    thresholds of one pass per layer."""
    ids, mask = batch
    found = {}
    for how in ("one forward", "layer by layer"):
        model = tiny_moe(family)
        attach_routers(model, expert_router_config(model))
        g = torch.Generator().manual_seed(0)
        for m in routed_layers(model).values():
            m.router.weight.data = torch.randn(m.router.weight.shape, generator=g)
        data = [{"input_ids": ids, "attention_mask": mask}]
        found[how] = calibrate_thresholds(model, data, 0.6) if how == "one forward" else _layer_by_layer(model, data,
                                                                                                         0.6)
    assert found["one forward"] == pytest.approx(found["layer by layer"], abs=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_real_equals_masked_and_experts_run_only_on_kept_tokens(family, implementation, batch, monkeypatch):
    ids, mask = batch
    model = attach_routers(tiny_moe(family, implementation), expert_router_config(tiny_moe(family)))
    random_expert_routers(model, ids, mask)
    with torch.no_grad(), routing_mode(model, "masked"):
        masked = model(input_ids=ids, attention_mask=mask)

    # record what the model's own experts forward is given in real mode
    base = type(routed_layers(model)[0]).__bases__[1]
    calls = []
    original = base.forward

    def spy(self, hidden_states, top_k_index, top_k_weights):
        calls.append((self.routing.layer_idx, top_k_index.detach().clone()))
        return original(self, hidden_states, top_k_index, top_k_weights)

    monkeypatch.setattr(base, "forward", spy)
    with torch.no_grad():
        real = model(input_ids=ids, attention_mask=mask)
    real_tokens = mask.bool()
    torch.testing.assert_close(real.logits[real_tokens], masked.logits[real_tokens], atol=1e-5, rtol=1e-5)
    frac = real.routing.capacity().item()
    assert 0.3 < frac < 0.9 and frac == masked.routing.capacity().item()
    # each layer's experts got exactly the kept (token, expert) pairs, one expert per row
    for (layer, given), d in zip(calls, real.routing.decisions):
        assert layer == d.layer and given.shape[1] == 1
        kept = d.experts[(d.keep * d.weight).bool()]
        assert torch.equal(torch.bincount(given[:, 0], minlength=8), torch.bincount(kept, minlength=8))


@pytest.mark.parametrize("family", FAMILIES)
def test_real_equals_masked_greedy_generation(family):
    ids, mask = left_padded_batch(lengths=(7, 4))
    model = attach_routers(tiny_moe(family), expert_router_config(tiny_moe(family)))
    random_expert_routers(model, ids, mask)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        real = model.generate(**kw)
        with routing_mode(model, "masked"):
            masked = model.generate(**kw)
    assert torch.equal(real, masked)


def test_real_vs_masked_report(batch):
    ids, mask = batch
    model = attach_routers(tiny_moe("olmoe", "grouped_mm"), expert_router_config(tiny_moe()))
    random_expert_routers(model, ids, mask, keep_fraction=0.5)
    report = real_vs_masked(model, [{"input_ids": ids, "attention_mask": mask}])
    assert report["tokens"] == mask.sum() and report["top1_agreement"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-4 and report["executed_real"] == report["executed_masked"] < 0.7


def test_load_statistics_add_up_to_the_gates_assignments(batch):
    ids, mask = batch
    model = tiny_moe("qwen2_moe")
    seen = {}  # the gate's own top-k indices per layer, captured from the gate's output
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[2]))
             for i, layer in enumerate(model.model.layers)]
    dense = expert_statistics(model, [{"input_ids": ids, "attention_mask": mask}])  # temporary zero routers
    for h in hooks:
        h.remove()
    assert getattr(model, "routertune", None) is None  # temporary routers removed
    real = mask.bool().reshape(-1)
    for i, idx in seen.items():
        gate_counts = torch.bincount(idx[real].reshape(-1), minlength=8).double()
        layer = dense[dense.layer == i].sort_values("expert")
        assert torch.equal(torch.tensor(layer.assigned.values), gate_counts)
        assert layer.assigned.sum() == real.sum() * 3 and (layer.executed == layer.assigned).all()

    attach_routers(model, expert_router_config(model))
    random_expert_routers(model, ids, mask)
    stats = normalised_load(expert_statistics(model, [{"input_ids": ids, "attention_mask": mask}]))
    assert (stats.assigned == dense.assigned).all() and (stats.executed <= stats.assigned).all()
    with torch.no_grad():
        trace = model(input_ids=ids, attention_mask=mask).routing
    for i, (executed, total) in trace.counts().items():
        layer = stats[stats.layer == i]
        assert layer.executed.sum() == executed and layer.assigned.sum() == total
        assert layer.assigned_load.mean() == pytest.approx(1.0) and layer.executed_load.mean() == pytest.approx(1.0)


def test_expert_drop_removes_the_least_important_experts_to_the_ratio(batch):
    ids, mask = batch
    data = [{"input_ids": ids, "attention_mask": mask}]
    model = tiny_moe("mixtral")
    stats = expert_statistics(model, data)
    plan, share = expert_drop_plan(stats, 0.25)
    assert abs(share - 0.25) < 0.1 and plan
    dropped = {(i, e) for i, es in plan.items() for e in es}
    kept_mass = stats[[(r.layer, r.expert) not in dropped for r in stats.itertuples()]].weight_mass
    dropped_mass = stats[[(r.layer, r.expert) in dropped for r in stats.itertuples()]].weight_mass
    assert dropped_mass.max() <= kept_mass.min()  # globally least important first
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    before = model_fingerprint(model)["weights"]
    attach_expert_drop(model, plan)
    after = expert_statistics(model, data)
    assert all(after.executed[(after.layer == i) & (after.expert == e)].item() == 0 for i, e in dropped)
    # the first layer sees the same inputs as before, so it drops exactly the planned assignments; later layers see
    # changed hidden states (the gate re-assigns), so the overall share is close to, not exactly, the plan's
    first = min(plan)
    planned = stats[(stats.layer == first) & stats.expert.isin(plan[first])].assigned.sum()
    got = after[after.layer == first]
    assert got.assigned.sum() - got.executed.sum() == planned
    assert 1 - after.executed.sum() / after.assigned.sum() == pytest.approx(share, abs=0.05)
    with torch.no_grad(), routing_mode(model, "masked"):
        masked = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        real = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(real[mask.bool()], masked[mask.bool()], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(real, ref)
    # the evaluation cache tells drop sets apart; the backbone fingerprint is unchanged
    fp = model_fingerprint(model)
    detach_routers(model)
    attach_expert_drop(model, {i: es[:-1] for i, es in plan.items()})
    assert fp["weights"] == before and model_fingerprint(model)["routers"] != fp["routers"]


def test_training_checkpoint_and_reload(tmp_path):
    model = tiny_moe("olmoe", "grouped_mm")
    config = expert_router_config(model, capacity=0.5, capacity_weight=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_routers(model, tiny_tokenizer(), conversations(16), config,
                           TrainConfig(**TRAIN, output_dir=str(tmp_path / "run")))
    after = dict(model.named_parameters())
    routers = [n for n in after if ".router." in n]
    assert len(routers) == 3 and result.trainable_parameters == 3 * 8 * 32
    assert all(torch.equal(before[n], after[n]) for n in before)  # backbone bit for bit
    assert all(after[n].abs().sum() > 0 for n in routers)
    assert {"capacity_L0", "capacity_L2"} <= set(result.history[0]) and result.history[-1]["capacity"] < 1.0

    ids, mask = left_padded_batch()
    set_thresholds(model, {0: 0.45, 1: 0.5, 2: 0.55})
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    path = save_routers(model, tmp_path / "routers.safetensors")
    fresh = load_routers(tiny_model_like(model), path)
    assert {i: m.routing.threshold for i, m in routed_layers(fresh).items()} == {0: 0.45, 1: 0.5, 2: 0.55}
    with torch.no_grad():
        out = fresh(input_ids=ids, attention_mask=mask)
    assert torch.equal(out.logits, ref.logits) and out.routing.capacity() == ref.routing.capacity()
    with pytest.raises(ValueError, match="trained for another model"):
        load_routers(tiny_moe("mixtral"), path)


@pytest.mark.parametrize("training_forward", ["masked", "real"])
def test_both_training_forwards_give_expert_routers_a_gradient_and_real_keeps_the_logits(training_forward, batch):
    ids, mask = batch
    model = tiny_moe("olmoe", "grouped_mm")
    for p in model.parameters():
        p.requires_grad_(False)
    attach_routers(model, expert_router_config(model))
    random_expert_routers(model, ids, mask)
    with torch.no_grad(), routing_mode(model, training_forward):
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    ctx = RoutingContext(training_forward, mask, RoutingTrace(), training_forward=training_forward)
    out = model(input_ids=ids, attention_mask=mask, routing_context=ctx, use_cache=False)
    assert torch.allclose(out.logits, ref, atol=1e-5)  # the straight-through factor is 1 in value
    grads = torch.autograd.grad(out.logits[mask.bool()].logsumexp(-1).sum(), [m.router.weight for m in
                                                                                routed_layers(model).values()])
    assert all(g.abs().sum() > 0 for g in grads)


def tiny_model_like(model):
    """A fresh copy of the tiny MoE's backbone without routers."""
    fresh = tiny_moe(model.config.model_type, model.config._experts_implementation)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".router." not in k})
    return fresh
