"""The paper's reported numbers (reference data shown beside ours; EMNLP camera-ready, ``../shared/reference/paper.md``).

Accuracies in %, speed-ups end to end (x). "(chart)" values are read off a figure to about +-0.5. Task keys are
:data:`routertune_lib.evaluation.TASK_REGISTRY` names; ``avg`` is the paper's own average.
"""

# Table 2, Llama-3-8B, 16 of 32 layers routed, 50% capacity. Accuracy in %, speed-up end to end.
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "dense": dict(speedup=1.00, arc_challenge=58.1, boolq=81.3, hellaswag=82.1, mmlu=65.3, openbookqa=45.0,
                  piqa=80.5, rte=67.2, winogrande=77.7, avg=69.7),
    "block_token": dict(speedup=1.24, arc_challenge=44.2, boolq=77.9, hellaswag=63.1, mmlu=64.4, openbookqa=34.0,
                        piqa=70.4, rte=65.4, winogrande=71.6, avg=61.4),
    "block_sequence": dict(speedup=1.26, arc_challenge=44.5, boolq=78.0, hellaswag=62.6, mmlu=64.6,
                           openbookqa=34.2, piqa=70.3, rte=65.3, winogrande=71.2, avg=61.3),
    "mlp_token": dict(speedup=1.05, arc_challenge=45.3, boolq=77.8, hellaswag=65.1, mmlu=62.8, openbookqa=33.7,
                      piqa=71.9, rte=66.8, winogrande=72.4, avg=62.0),
    "mlp_sequence": dict(speedup=1.06, arc_challenge=45.1, boolq=77.7, hellaswag=65.4, mmlu=62.4, openbookqa=33.4,
                         piqa=71.6, rte=66.4, winogrande=72.1, avg=61.8),
    "attn_token": dict(speedup=1.18, arc_challenge=56.4, boolq=79.8, hellaswag=81.0, mmlu=65.3, openbookqa=45.2,
                       piqa=79.9, rte=64.6, winogrande=77.3, avg=68.7),
    "attn_sequence": dict(speedup=1.21, arc_challenge=56.6, boolq=80.5, hellaswag=80.7, mmlu=65.1, openbookqa=44.6,
                          piqa=80.5, rte=69.7, winogrande=77.7, avg=69.4),
}

# Figure 2 (chart), Llama-3-8B, 25% overall skipping: static Layer Drop vs Router-Tuning, accuracy in %.
PAPER_FIGURE2: dict[str, dict[str, float]] = {
    "mlp_layerdrop": dict(arc_challenge=32.2, mmlu=51.9, openbookqa=32.5, rte=55.3),
    "mlp_router": dict(arc_challenge=51.0, mmlu=55.8, openbookqa=38.1, rte=64.6),
    "attn_layerdrop": dict(arc_challenge=56.2, mmlu=64.6, openbookqa=44.1, rte=67.5),
    "attn_router": dict(arc_challenge=57.4, mmlu=66.0, openbookqa=45.4, rte=69.8),
}

# Figure 4: after Router-Tuning every routed layer skips part of the inputs (about 25%..75%, mean about 53%);
# Layer Drop removes 8 of the 16 routed layers entirely.
PAPER_FIGURE4 = dict(router_skip_min=0.25, router_skip_max=0.75, router_skip_mean=0.53, layerdrop_layers=8,
                     routed_layers=16)

# Figure 3 (chart), Llama-3-8B, GSM8K 5-shot exact match at 12.5% / 25% overall attention skipping.
PAPER_FIGURE3: dict[str, dict[float, float]] = {
    "dense": {0.0: 50.4},
    "attn_drop": {0.125: 43.4, 0.25: 38.1},
    "router": {0.125: 48.8, 0.25: 44.6},
}

# Table 3, MLP token level, average of ARC-C, HellaSwag, MMLU, WinoGrande.
PAPER_TABLE3 = {"DLO": 60.5, "Skip Transformer": 60.8, "Router-Tuning": 61.4}

# Table 4: training cost as reported (not measured on comparable hardware).
PAPER_TABLE4 = {"MoD": "full pretraining", "DLO": "full model, 36 h on an A100",
                "Router-Tuning": "routers only, 15 min on an A6000"}

# Figure 5 (chart): paper average accuracy vs number of routed layers.
PAPER_FIGURE5: dict[str, dict[int, float]] = {
    "Qwen2.5-7B": {0: 73.4, 4: 73.3, 8: 73.2, 12: 72.9, 16: 72.3, 20: 71.1, 24: 68.7},
    "Mistral-7B": {0: 70.3, 4: 70.25, 8: 70.2, 12: 70.05, 16: 69.7, 20: 68.4, 24: 66.4},
}
# Figure 6: small models, average accuracy vs number of routed layers.
PAPER_FIGURE6: dict[str, dict[int, float]] = {
    "Qwen2.5-1.5B": {0: 63.4, 10: 63.2, 14: 62.8},
    "Qwen2.5-3B": {0: 67.7, 12: 67.4, 16: 66.7},
}

# Table 5: half the layers routed, 50% capacity: average dense -> routed and speed-up.
PAPER_TABLE5: dict[str, dict[str, float]] = {
    "Llama-2-13B": dict(dense=68.0, routed=67.9, speedup=1.22),
    "Qwen2.5-14B": dict(dense=75.5, routed=74.7, speedup=1.18),
    "Qwen2.5-7B": dict(dense=73.4, routed=72.3, speedup=1.19),
    "Mistral-7B": dict(dense=70.3, routed=69.7, speedup=1.24),
}

# Table 6, Llama-3-8B, average of HellaSwag, MMLU, OBQA, WinoGrande by router-tuning data.
PAPER_TABLE6 = {"baseline": 67.5, "Alpaca": 65.8, "Evol-Instruct": 66.6, "ShareGPT": 66.5, "Llama-Pro mix": 67.0}
# Figure 7, Llama-3-8B-Instruct, same four tasks, by number of training samples (0 = dense).
PAPER_FIGURE7 = {0: 65.8, 1000: 63.8, 2000: 64.9, 5000: 65.6, 10000: 65.1}

# Table 7, MoE at 25% overall skipping: average accuracy and speed-up.
PAPER_TABLE7: dict[str, dict[str, float]] = {
    "DeepSeek-MoE": dict(dense=63.7, expert_drop=61.1, expert_drop_speedup=1.11, router=62.4, router_speedup=1.10),
    "OLMoE": dict(dense=64.0, expert_drop=50.2, expert_drop_speedup=1.13, router=61.4, router_speedup=1.12),
}
# Figure 8: load of the most loaded expert relative to the mean, before / after router filtering.
PAPER_FIGURE8 = {"max_load_before": 6.7, "max_load_after": 1.9}

# Table 8: with LoRA, average accuracy (speed-up where routed).
PAPER_TABLE8: dict[str, dict[str, float]] = {
    "Llama-3-8B": dict(dense=69.6, router=69.5, router_speedup=1.21, lora=71.0, lora_router=70.9,
                       lora_router_speedup=1.21),
    "Mistral-7B": dict(dense=70.3, router=70.0, router_speedup=1.24, lora=71.1, lora_router=71.2,
                       lora_router_speedup=1.24),
}

# The paper's models: hub id (the ``paper`` profile loads them from there) and number of decoder layers (from each
# model's config; Figures 5-6 are compared with ours as a fraction of routed layers). Mistral-7B: v0.1 assumed.
PAPER_MODELS: dict[str, dict] = {
    "Llama-3-8B": dict(hub_id="meta-llama/Meta-Llama-3-8B", num_layers=32),
    "Llama-2-13B": dict(hub_id="meta-llama/Llama-2-13b-hf", num_layers=40),
    "Qwen2.5-14B": dict(hub_id="Qwen/Qwen2.5-14B", num_layers=48),
    "Qwen2.5-7B": dict(hub_id="Qwen/Qwen2.5-7B", num_layers=28),
    "Qwen2.5-3B": dict(hub_id="Qwen/Qwen2.5-3B", num_layers=36),
    "Qwen2.5-1.5B": dict(hub_id="Qwen/Qwen2.5-1.5B", num_layers=28),
    "Mistral-7B": dict(hub_id="mistralai/Mistral-7B-v0.1", num_layers=32),
}
