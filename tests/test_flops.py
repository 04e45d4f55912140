"""Executed-FLOP fraction (``routertune_lib.flops``): expected values computed by hand from the formula."""

import pytest
import torch
from transformers import OlmoeConfig, Qwen2MoeConfig

from conftest import TINY, tiny_model
from routertune_lib.baselines import attach_static_drop
from routertune_lib.flops import FlopSpec, flop_fraction_from_counts, forward_flops, record_flops
from routertune_lib.moe import attach_expert_drop
from routertune_lib.routing import RouterConfig, attach_routers, routing_mode

D, FF, V, N = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"], TINY["num_hidden_layers"]
DQ = D  # 4 heads x head_dim 8
DKV = TINY["num_key_value_heads"] * (D // TINY["num_attention_heads"])


def hand_parts(B, contexts, scored):
    """Per-layer attention and MLP FLOPs and the LM head of one forward, straight from measurement.md."""
    T = len(contexts)
    attn = B * sum(2 * D * (DQ + 2 * DKV) + 2 * DQ * D + 2 * 2 * s * DQ for s in contexts)
    mlp = B * T * 2 * 3 * D * FF
    return attn, mlp, B * scored * 2 * D * V


def prefill(model, B=2, T=5):
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(0))
    with record_flops(model) as c:
        model(input_ids=ids, use_cache=False)
    return c


def test_dense_model_counts_the_formula_and_gives_one():
    c = prefill(tiny_model("llama"))
    attn, mlp, head = hand_parts(2, range(1, 6), 5)
    assert c.dense == pytest.approx(N * (attn + mlp) + head)
    assert c.executed == c.dense and c.fraction() == 1.0


@pytest.mark.parametrize("target", ["attn", "mlp", "block"])
def test_static_drop_of_k_layers_removes_exactly_their_target(target):
    k = 2
    c = prefill(attach_static_drop(tiny_model("llama"), target, [1, 3]))
    attn, mlp, head = hand_parts(2, range(1, 6), 5)
    saved = {"attn": attn, "mlp": mlp, "block": attn + mlp}[target]
    total = N * (attn + mlp) + head
    assert c.fraction() == pytest.approx((total - k * saved) / total)


def test_routers_that_keep_everything_and_masked_mode_give_one():
    model = attach_routers(tiny_model("llama"), RouterConfig(target="block", level="token", num_layers=3))
    assert prefill(model).fraction() == 1.0  # zero routers keep every token
    static = attach_static_drop(tiny_model("llama"), "block", [0, 1, 2])
    with routing_mode(static, "masked"):
        assert prefill(static).fraction() == 1.0  # masked computes everything


def test_token_level_attention_skip_still_writes_kv():
    spec = FlopSpec.from_config(tiny_model("llama").config)
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0]])  # tokens 2 and 4 skip layer 0's attention
    executed, dense = forward_flops(spec, "attn", {0: keep}, batch=1, new=4)
    skipped = sum(2 * D * DQ + 2 * DQ * D + 2 * 2 * s * DQ for s in (2, 4))  # no q, o, scores; k and v stay
    assert dense - executed == pytest.approx(skipped)
    seq_executed, _ = forward_flops(spec, "attn", {0: torch.tensor([0.0])}, batch=1, new=4)
    attn, _, _ = hand_parts(1, range(1, 5), 4)
    assert dense - seq_executed == pytest.approx(attn)  # a skipped sequence writes no K/V either


def test_generation_counts_decode_steps_against_the_cache():
    model = attach_static_drop(tiny_model("llama"), "attn", [2])
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(0))
    with record_flops(model) as c:
        model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    # prefill of 5 tokens (generation scores the last position only), then 2 decode steps seeing 6 and 7 keys
    parts = [hand_parts(2, range(1, 6), 1), hand_parts(2, [6], 1), hand_parts(2, [7], 1)]
    total = sum(N * (a + m) + h for a, m, h in parts)
    assert c.dense == pytest.approx(total)
    assert c.fraction() == pytest.approx((total - sum(a for a, _, _ in parts)) / total)


def test_fraction_from_counts_matches_a_traced_forward():
    config = tiny_model("llama").config
    counts = {1: (0.0, 2.0), 3: (0.0, 2.0), 4: (2.0, 2.0)}  # sequence level: layers 1 and 3 skipped by both rows
    traced = prefill(attach_static_drop(tiny_model("llama"), "block", [1, 3])).fraction()
    assert flop_fraction_from_counts(config, "block", "sequence", counts, seq_len=5) == pytest.approx(traced)
    assert flop_fraction_from_counts(config, "mlp", "token", {0: (7.0, 7.0)}, seq_len=5) == 1.0
    with pytest.raises(ValueError, match="target 'ffn'"):
        flop_fraction_from_counts(config, "ffn", "token", counts, seq_len=5)


def test_sliding_window_layers_see_at_most_the_window():
    spec = FlopSpec.from_config(tiny_model("gemma3").config)  # window 4 on every other layer
    sliding = [i for i, w in enumerate(spec.windows) if w is not None]
    full = [i for i, w in enumerate(spec.windows) if w is None]
    assert sliding and full and spec.q_width == 4 * 8
    assert spec.contexts(sliding[0], past=2, new=4).tolist() == [3, 4, 4, 4]
    assert spec.contexts(full[0], past=2, new=4).tolist() == [3, 4, 5, 6]


def test_expert_drop_removes_the_dropped_assignments():
    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, pad_token_id=0)
    from transformers import AutoModelForCausalLM

    model = attach_expert_drop(AutoModelForCausalLM.from_config(config).eval(), {0: [1], 1: [0, 2]})
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(0))
    with record_flops(model) as c:
        out = model(input_ids=ids, use_cache=False)
    dropped = sum(n - e for e, n in out.routing.counts().values())
    assert dropped > 0
    assert c.dense - c.executed == pytest.approx(dropped * 2 * 3 * 32 * 16)


def test_deepseek_v2_counts_latent_attention_dense_first_layers_and_shared_experts():
    """DeepSeek-V2 (notebook 08's paper model; the cpu profile times a random OLMoE only): MLA projections and
    scores, a dense first layer, shared experts that always run; Expert Drop removes only routed assignments."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    torch.manual_seed(0)
    d, H, nope, rope, v, rank, E, k, ff_e, ff = 32, 4, 8, 4, 8, 16, 4, 2, 16, 48
    config = DeepseekV2Config(vocab_size=V, hidden_size=d, intermediate_size=ff, moe_intermediate_size=ff_e,
                              num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=H, n_routed_experts=E,
                              n_shared_experts=1, num_experts_per_tok=k, first_k_dense_replace=1, kv_lora_rank=rank,
                              q_lora_rank=None, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
                              topk_method="greedy", n_group=1, topk_group=1, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    B, T = 2, 5
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(0))
    with record_flops(model) as c:
        model(input_ids=ids, use_cache=False)
    per_token = 2 * d * H * (nope + rope) + 2 * H * v * d + 2 * d * (rank + rope) + 2 * rank * H * (nope + v)
    attn = B * sum(per_token + 2 * s * H * (nope + rope + v) for s in range(1, T + 1))
    dense_mlp = B * T * 2 * 3 * d * ff
    moe = B * T * (2 * d * E + 2 * 3 * d * ff_e + k * 2 * 3 * d * ff_e)  # gate, one shared expert, k routed ones
    assert c.dense == pytest.approx(2 * attn + dense_mlp + moe + B * T * 2 * d * V) and c.fraction() == 1.0
    dropped_model = attach_expert_drop(model, {1: [0, 2]})
    with record_flops(dropped_model) as c:
        out = dropped_model(input_ids=ids, use_cache=False)
    dropped = sum(n - e for e, n in out.routing.counts().values())
    assert dropped > 0
    assert c.dense - c.executed == pytest.approx(dropped * 2 * 3 * d * ff_e)


def test_unsupported_architecture_is_named():
    with pytest.raises(NotImplementedError, match="qwen2_moe"):
        FlopSpec.from_config(Qwen2MoeConfig())
