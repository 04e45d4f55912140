"""Static drop (LLM-Drop importance) through the real-skip path."""

import pytest
import torch
from conftest import left_padded_batch, tiny_model

from routertune_lib.baselines import attach_static_drop, least_important, module_importance
from routertune_lib.routing import routing_mode


def test_importance_is_one_minus_cosine_per_module():
    ids, mask = left_padded_batch()
    model = tiny_model("llama")
    imp = module_importance(model, [{"input_ids": ids, "attention_mask": mask}])
    assert set(imp) == {"attn", "mlp", "block"}
    for target in imp:
        assert set(imp[target]) == set(range(6))
        assert all(0.0 <= v <= 2.0 for v in imp[target].values())
    # block importance of layer 0, recomputed by hand from the hidden states
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity(hs[0], hs[1], dim=-1)
    expected = 1 - float((cos * mask).sum() / mask.sum())
    assert imp["block"][0] == pytest.approx(expected, abs=1e-5)


def test_least_important_picks_lowest_scores():
    assert least_important({0: 0.5, 1: 0.1, 2: 0.3, 3: 0.05}, 2) == [1, 3]
    assert least_important({0: 0.5, 1: 0.1, 2: 0.3, 3: 0.05}, 1, candidates=[0, 2]) == [2]
    with pytest.raises(ValueError, match="num_drop"):
        least_important({0: 0.1}, 2)


@pytest.mark.parametrize("target", ["attn", "mlp", "block"])
def test_static_drop_skips_modules_and_their_cache(target):
    ids, mask = left_padded_batch()
    model = tiny_model("llama")
    attach_static_drop(model, target, [2, 4])
    calls = []
    for i in (2, 4):
        module = model.model.layers[i].mlp if target == "mlp" else model.model.layers[i].self_attn
        module.register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert calls == []
        with routing_mode(model, "masked"):
            ref = model(input_ids=ids, attention_mask=mask).logits
            ref_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.routing.executed_fraction() == {2: 0.0, 4: 0.0}
    torch.testing.assert_close(out.logits[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-5)
    assert torch.equal(gen, ref_gen)
    stored = [out.cache.layers[i].keys.numel() for i in (2, 4)]
    assert stored == ([0, 0] if target != "mlp" else [out.cache.layers[0].keys.numel()] * 2)
