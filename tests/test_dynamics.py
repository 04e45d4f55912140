"""Router dynamics diagnostics on tiny random models and hand-built geometry."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from routertune_lib.batching import collate, num_labels, pad_id, tokenize_conversations
from routertune_lib.dynamics import (LayerInputs, capacity_jumps, capacity_trajectory, capacity_weight_for,
                                     decision_pull, decompose, document_kl, fidelity_table, paired_difference,
                                     replace_orthogonal_part, router_inputs, router_score_distributions, skip_effect,
                                     weight_geometry)
from routertune_lib.evaluation import mean_kl
from routertune_lib.experiments import randomize_routers
from routertune_lib.routing import RouterConfig, attach_routers, routed_layers, set_thresholds

from _two_process_train import conversations, tiny_tokenizer
from conftest import tiny_model


class _Tok:
    """Whitespace tokenizer over the tiny vocabulary (ids 1..95), enough for ``tok_encode`` and texts."""

    bos_token_id = None
    eos_token_id = 95
    pad_token_id = 0

    def decode(self, token_id):
        return "<eos>"

    def encode(self, text, add_special_tokens=True):
        return [1 + sum(map(ord, w)) % 95 for w in text.split()]

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [self.encode(t) for t in texts]}


TEXTS = ["the cat sat on the mat today", "a b c", "one two three four five six seven eight nine",
         "hello world", "to be or not to be that is", "x y z w"]


def routed_tiny(seed=0, level="sequence"):
    model = attach_routers(tiny_model(), RouterConfig(target="attn", level=level, num_layers=3))
    randomize_routers(model, seed=seed)
    return model


def batches(model):
    ids = torch.randint(1, 96, (5, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def test_router_inputs_reproduce_the_routers_scores_and_decisions():
    model = routed_tiny()
    set_thresholds(model, 0.5)
    inputs = router_inputs(model, batches(model))
    assert sorted(inputs) == sorted(routed_layers(model))
    for li in inputs.values():
        assert li.means.shape == (5, 32) and li.logits.shape == li.scores.shape == li.keep.shape == (5,)
        torch.testing.assert_close(torch.sigmoid(li.logits).float(), li.scores, atol=1e-5, rtol=0)
        assert torch.equal(li.keep, li.scores >= li.threshold)


def test_score_distributions_shapes_and_shares():
    model = routed_tiny()
    per_seq, per_layer = router_score_distributions(model, batches(model))
    assert len(per_seq) == 5 * 3 and len(per_layer) == 3
    np.testing.assert_allclose(per_layer.kept_share + per_layer.skipped_share, 1.0)
    for _, r in per_layer.iterrows():
        s = per_seq[per_seq.layer == r.layer]
        assert r.kept_share == pytest.approx(float(s.kept.mean()))
        assert r.threshold_logit == pytest.approx(0.0)
        assert r.offset_std == pytest.approx(s.logit.mean() / s.logit.std(ddof=0))


def test_token_level_routers_are_rejected():
    model = routed_tiny(level="token")
    with pytest.raises(ValueError, match="sequence-level"):
        router_inputs(model, batches(model))


def test_decomposition_reconstructs_logit_and_variance_exactly():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(40, 16, generator=g, dtype=torch.float64) + 3.0
    w = torch.randn(16, generator=g, dtype=torch.float64)
    parts = decompose(means, w)
    torch.testing.assert_close(parts["w_par"] + parts["w_perp"], w)
    torch.testing.assert_close(parts["par"] + parts["perp"], means @ w)
    assert float(parts["w_perp"] @ means.mean(0)) == pytest.approx(0.0, abs=1e-10)
    li = LayerInputs(0, means, means @ w, torch.sigmoid(means @ w).float(), means @ w >= 0, 0.5, w)
    geo = weight_geometry({0: li}).iloc[0]
    assert geo.var_par + geo.var_perp + geo.var_cross == pytest.approx(1.0)
    assert geo.logit_mean == pytest.approx(float(w @ means.mean(0)))


def test_known_geometry_gives_hand_computed_shares():
    # means (1 + s_n, t_n, 0, 0): centroid along e1; s, t have mean 0, variance 1 and zero covariance
    s = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    t = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    means = torch.stack([1 + 0.1 * s, 0.1 * t, 0 * s, 0 * s], 1)
    w = torch.tensor([2.0, 1.0, 5.0, 0.0], dtype=torch.float64)
    li = LayerInputs(3, means, means @ w, torch.sigmoid(means @ w).float(), means @ w >= 0, 0.5, w)
    geo = weight_geometry({3: li}, lr=0.01).iloc[0]
    # var(par) = 2^2 * 0.01, var(perp) = 1^2 * 0.01
    assert geo.var_par == pytest.approx(0.8) and geo.var_perp == pytest.approx(0.2)
    assert geo.var_cross == pytest.approx(0.0, abs=1e-12)
    assert geo.logit_mean == pytest.approx(2.0) and geo.logit_std == pytest.approx(math.sqrt(0.05))
    assert geo.w_cos_centroid == pytest.approx(2.0 / math.sqrt(30))
    assert geo.step_shift_std == pytest.approx(0.01 * 1.0 / math.sqrt(0.05))
    assert geo.cos_mean == pytest.approx(float(np.mean(1.0 / np.sqrt(1 + 0.01 / np.array([1.21, 0.81, 1.21, 0.81])))))


@pytest.mark.parametrize("kind", ["random", "zero"])
def test_replace_orthogonal_part_keeps_the_centroid_component(kind):
    model = routed_tiny()
    inputs = router_inputs(model, batches(model))
    centroids = {i: li.means.mean(0) for i, li in inputs.items()}
    replace_orthogonal_part(model, centroids, kind=kind, seed=3)
    for i, layer in routed_layers(model).items():
        old = decompose(inputs[i].means, inputs[i].weight)
        new = decompose(inputs[i].means, layer.router.weight.detach().double()[0])
        torch.testing.assert_close(new["w_par"], old["w_par"], atol=1e-6, rtol=1e-5)
        expected = 0.0 if kind == "zero" else float(old["w_perp"].norm())
        assert float(new["w_perp"].norm()) == pytest.approx(expected, abs=1e-6, rel=1e-5)
        if kind == "random":
            assert abs(float(torch.nn.functional.cosine_similarity(new["w_perp"], old["w_perp"], dim=0))) < 0.99
    with pytest.raises(ValueError, match="no centroid"):
        replace_orthogonal_part(model, {}, kind="zero")


def test_document_kl_matches_mean_kl_and_is_zero_for_the_dense_model():
    tok = _Tok()
    dense = tiny_model()
    model = routed_tiny()
    set_thresholds(model, 0.5)
    table, executed = document_kl(dense, {"same": tiny_model(), "routed": model}, tok, TEXTS, batch_size=4)
    assert list(table.columns) == ["doc", "tokens", "same", "routed"] and len(table) == len(TEXTS)
    np.testing.assert_allclose(table["same"], 0.0, atol=1e-6)
    weighted = float((table.routed * table.tokens).sum() / table.tokens.sum())
    assert weighted == pytest.approx(mean_kl(dense, model, tok, TEXTS, batch_size=3), rel=1e-4, abs=1e-7)
    assert set(executed) == {"routed"} and 0.0 <= executed["routed"]["overall"] <= 1.0
    assert sorted(executed["routed"]["layers"]) == sorted(routed_layers(model))


def test_fidelity_table_verdicts_follow_the_ci():
    rng = np.random.default_rng(0)
    ref = rng.random(200)
    kl = pd.DataFrame({"doc": range(200), "tokens": 10, "router": ref, "worse": ref + 0.5 + 0.01 * rng.random(200),
                       "better": ref - 0.5, "same": ref + 0.01 * rng.standard_normal(200)})
    t = fidelity_table(kl, "router", n_boot=2000).set_index("setting")
    assert t.loc["router", "verdict"] == "reference"
    assert t.loc["worse", "verdict"] == "holds" and t.loc["better", "verdict"] == "reversed"
    assert t.loc["same", "verdict"] == "unresolved"
    assert t.loc["worse", "ci_low"] <= t.loc["worse", "diff"] <= t.loc["worse", "ci_high"]
    with pytest.raises(ValueError, match="reference"):
        fidelity_table(kl, "nope")
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 2.0], [1.0])


def test_decision_pull_is_the_derivative_of_the_task_loss_in_the_layer_output_scale():
    """pull_l = -dL/d(alpha) at alpha = 1, where alpha scales layer l's attention output for every sequence (the
    sum over sequences of -dL/dkeep), checked by central differences in float64 over two padded batches."""
    tok, convs = tiny_tokenizer(), conversations(6)
    model = attach_routers(tiny_model().double(), RouterConfig(target="attn", level="sequence", num_layers=3))
    for layer in routed_layers(model).values():
        layer.router.weight.requires_grad_(False)
    pull = decision_pull(model, convs, tok, max_length=64, batch_size=4).set_index("layer")
    assert list(pull.index) == list(routed_layers(model)) and (pull.executed == 1.0).all()  # zero init: dense
    assert np.allclose(pull.push, 1 / 3) and np.allclose(pull.switch_weight, 3 * pull.pull)  # zero init: 1 / layers
    assert not any(layer.router.weight.requires_grad for layer in routed_layers(model).values())  # flags put back

    rows = tokenize_conversations(tok, convs, 64)
    batches = [collate(rows[s : s + 4], pad_id(tok)) for s in range(0, len(rows), 4)]
    n = sum(map(num_labels, rows))

    def loss(layer, alpha):
        attn = routed_layers(model)[layer].self_attn
        handle = attn.register_forward_hook(lambda m, a, out: (out[0] * alpha, *out[1:]))
        try:
            with torch.no_grad():  # float64 cross-entropy (label_ce_sum's float32 would swamp the differences)
                return sum(float(F.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                       use_cache=False).logits[:, :-1].flatten(0, 1),
                                                 b["labels"][:, 1:].flatten(), reduction="sum"))
                           for b in batches) / n
        finally:
            handle.remove()

    eps = 1e-4
    for layer, row in pull.iterrows():
        numeric = -(loss(layer, 1 + eps) - loss(layer, 1 - eps)) / (2 * eps)
        assert numeric == pytest.approx(row.pull, rel=1e-3, abs=2e-6), layer  # float32 CE in the pull
    assert pull.pull.abs().max() > 1e-4  # the check is not vacuous


def test_skip_effect_is_the_loss_of_forcing_each_layer_off_and_on():
    """secant = loss with the layer skipped for every sequence - loss with it kept, the others as decided; a layer
    already kept everywhere has loss_keep equal to the model's loss, and the secant of a trained network is not its
    slope (the pull)."""
    tok, convs = tiny_tokenizer(), conversations(6)
    model = attach_routers(tiny_model(), RouterConfig(target="attn", level="sequence", num_layers=3))
    effect = skip_effect(model, convs, tok, max_length=64, batch_size=4).set_index("layer")
    rows = tokenize_conversations(tok, convs, 64)
    b = collate(rows, pad_id(tok))
    with torch.no_grad():
        dense = float(F.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                            use_cache=False).logits[:, :-1].flatten(0, 1),
                                      b["labels"][:, 1:].flatten(), reduction="sum")) / sum(map(num_labels, rows))
    assert np.allclose(effect.loss_keep, dense, rtol=1e-5)  # zero init keeps everything
    assert np.allclose(effect.secant, effect.loss_skip - effect.loss_keep) and (effect.secant != 0).all()
    first = list(effect.index)[0]
    static = attach_routers(tiny_model(), RouterConfig(target="attn", level="sequence", layers=[first]),
                            static_drop=True)
    with torch.no_grad():
        skipped = float(F.cross_entropy(static(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                               use_cache=False).logits[:, :-1].flatten(0, 1),
                                        b["labels"][:, 1:].flatten(), reduction="sum")) / sum(map(num_labels, rows))
    assert effect.loss_skip[first] == pytest.approx(skipped, rel=1e-5)  # forcing the skip = static drop of it
    assert all(layer.routing.fixed_keep is None for layer in routed_layers(model).values())  # put back


def test_capacity_weight_for_keeps_the_top_layers_on():
    pull = pd.DataFrame({"layer": range(6), "switch_weight": [0.5, 0.02, 0.3, 0.08, 0.001, 0.18]})
    lam = capacity_weight_for(pull, 0.5)  # keep 3 of 6: between 0.18 and 0.08
    assert lam == pytest.approx(math.sqrt(0.18 * 0.08), rel=0.02) and (pull.switch_weight > lam).sum() == 3
    assert (pull.switch_weight > capacity_weight_for(pull, 0.3)).sum() == 2  # ceil(1.8) = 2
    negative = pull.assign(switch_weight=[0.5, -0.1, 0.3, -0.2, -0.3, 0.18])
    assert capacity_weight_for(negative, 0.5) == pytest.approx(0.09)  # the 4th is negative: half the 3rd
    with pytest.raises(ValueError, match="capacity must be in"):
        capacity_weight_for(pull, 1.0)
    assert capacity_weight_for(negative, 0.6) is None  # 4 layers to keep, 3 with a positive switch weight


def test_capacity_trajectory_and_jumps(tmp_path):
    path = tmp_path / "train_log.csv"
    pd.DataFrame({"step": [1, 2, 3], "lr": [0.0, 1e-3, 1e-3], "capacity": [1.0, 0.5, 0.5],
                  "capacity_L4": [1.0, 0.0, 0.0], "capacity_L5": [1.0, 1.0, 0.75]}).to_csv(path, index=False)
    traj = capacity_trajectory(path)
    assert list(traj.columns) == ["step", "lr", "layer", "capacity"] and len(traj) == 6
    jumps = capacity_jumps(traj)
    assert jumps.to_dict("records") == [{"layer": 4, "step": 2, "lr": 1e-3, "before": 1.0, "after": 0.0}]
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"step": [1], "loss": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="capacity_L"):
        capacity_trajectory(bad)


