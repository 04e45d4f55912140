"""Training cost (Table 4): one process per method on a tiny random model, the derived table, config checks, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from routertune_lib.models import tiny_random_model
from routertune_lib.training_cost import METHODS, CostConfig, cost_table, measure_methods, training_cost

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model=None, samples=8, held_out=4, max_length=128, global_batch=4, micro_batch=2, num_layers=2,
            steps_other=1)


@pytest.mark.model  # tiny_random_model reads the SmolLM2 config and tokenizer, converted from its GGUF
def test_each_method_runs_in_its_own_process_on_the_same_steps():
    config = CostConfig(**TINY)
    rows = measure_methods(config)
    assert [r["method"] for r in rows] == list(METHODS)
    by = {r["method"]: r for r in rows}
    hidden = tiny_random_model()[0].config.hidden_size
    # routers: one Linear(d, 1) per routed layer; every step of the epoch; capacities measured after calibration
    assert by["routers"]["trainable"] == 2 * hidden and by["routers"]["steps_run"] == 2 == by["routers"]["steps_total"]
    assert len(by["routers"]["layers"]) == 2
    for k in ("capacity_trained", "capacity_calibrated", "capacity_held_out"):
        assert 0.0 <= by["routers"][k] <= 1.0
    # LoRA: more than the routers, far fewer than the model; full fine-tuning: everything; steps_other = 1 step each
    assert by["routers"]["trainable"] < by["lora"]["trainable"] < by["lora"]["total"]
    assert by["full"]["trainable"] == by["full"]["total"]
    assert by["lora"]["steps_run"] == by["full"]["steps_run"] == 1
    for r in rows:
        assert r["wall_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["peak_rss_bytes"] > 0
        assert r["peak_memory_kind"] in ("process_peak_rss", "cuda_max_allocated")
        assert r["final_loss"] is not None and r["final_loss"] > 0
    df = cost_table(rows)
    assert list(df.epoch_time) == ["measured", "extrapolated", "extrapolated"]
    assert df.set_index("method").time_vs_routers["routers"] == 1.0


def test_cost_table_extrapolates_and_compares_with_router_tuning():
    rows = [dict(method="routers", steps_total=10, steps_run=10, wall_s=20.0, tokens_per_s=1.0, trainable=10,
                 total=1000, peak_memory_bytes=2**30, peak_rss_bytes=2**30),
            dict(method="full", steps_total=10, steps_run=2, wall_s=10.0, tokens_per_s=1.0, trainable=1000,
                 total=1000, peak_memory_bytes=3 * 2**30, peak_rss_bytes=3 * 2**30)]
    df = cost_table(rows).set_index("method")
    assert df.wall_s_epoch["full"] == 50.0 and df.time_vs_routers["full"] == 2.5
    assert df.epoch_time["full"] == "extrapolated" and df.epoch_time["routers"] == "measured"
    assert df.trainable_pct["routers"] == 1.0 and df.peak_memory_gib["full"] == 3.0
    assert cost_table(rows[1:]).time_vs_routers.isna().all()  # no Router-Tuning row: nothing to compare with


def test_config_and_methods_are_checked():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        CostConfig(samples=8, global_batch=16)
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        CostConfig(samples=16, global_batch=6, micro_batch=4)
    with pytest.raises(ValueError, match="unknown keys"):
        CostConfig.from_dict({"modle": "x"})
    assert CostConfig.from_dict(CostConfig(**TINY).to_dict()) == CostConfig(**TINY)
    with pytest.raises(ValueError, match="valid methods"):
        training_cost(CostConfig(**TINY), ["qlora"])


def test_benchmark_cli_keeps_its_internal_one_method_entry():
    """``benchmarks/training_cost.py --method routers`` runs one method in-process and prints ``RESULT {json}``."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_cost.py"), "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    for flag in ("--samples", "--held-out", "--max-length", "--global-batch", "--micro-batch", "--num-layers",
                 "--capacity", "--capacity-weight", "--lr", "--lr-lora", "--lr-full", "--steps-other", "--seed",
                 "--methods", "--out", "--model"):
        assert flag in proc.stdout
    child = subprocess.run([sys.executable, "-m", "routertune_lib.training_cost", "--method", "routers", "--config",
                            json.dumps(CostConfig(**TINY).to_dict())], capture_output=True, text=True, cwd=ROOT)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(next(l for l in child.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert result["method"] == "routers" and result["steps_run"] == 2


def test_committed_benchmark_reads_the_results_of_the_cli():
    from routertune_lib.training_cost import committed_benchmark

    assert committed_benchmark("no-such-model") is None
    bench = committed_benchmark("smollm2-135m")
    if bench is None:
        pytest.skip("no committed results/training_cost run in this checkout")
    assert bench["command"].startswith("python benchmarks/training_cost.py")
    assert set(bench["table"].method) <= set(METHODS) and (bench["table"].peak_memory_gib > 0).all()
