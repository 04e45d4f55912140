"""Mechanics of ``speed.compare_settings`` (interleaving, confidence intervals, fixed generation length, FLOPs).

No test asserts on a measured time: synthetic times go through a stub of ``_run_pool``, and real runs on tiny models
check only deterministic outputs.
"""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from routertune_lib import speed
from routertune_lib.baselines import attach_static_drop
from routertune_lib.routing import RouterConfig, attach_routers
from routertune_lib.speed import compare_settings, median_ci


def test_median_ci_is_min_max_for_five_rounds_and_order_statistics_beyond():
    assert median_ci([1.3, 1.1, 1.2, 1.0, 1.4]) == (1.2, 1.0, 1.4, 1 - 2 / 32)
    nine = [float(v) for v in range(9, 0, -1)]
    point, low, high, coverage = median_ci(nine)
    assert (point, low, high) == (5.0, 2.0, 8.0)  # k = 2: 1 - 2 * (1 + 9) / 512 >= 0.95, k = 3 is not
    assert coverage == pytest.approx(1 - 2 * 10 / 512)
    assert median_ci([2.0]) == (2.0, 2.0, 2.0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        median_ci([])


def test_settings_are_interleaved_after_a_flop_counting_warmup_and_ratios_are_per_round(monkeypatch):
    models = {name: torch.nn.Linear(1, 1) for name in ("dense", "a", "b")}
    names = {id(m): n for n, m in models.items()}
    ratio = {"dense": [1.0] * 5, "a": [1.5, 1.1, 1.3, 0.9, 1.2], "b": [2.0, 2.0, 2.0, 2.0, 2.0]}
    base = [10.0, 30.0, 20.0, 50.0, 40.0]  # machine load drifts between rounds
    calls = []

    def fake_run_pool(model, prompts, batch_size, new_tokens, count_flops=False):
        name = names[id(model)]
        calls.append((name, count_flops))
        r = sum(1 for n, _ in calls if n == name) - 2  # timed round index (-1: warm-up)
        t = base[r] / ratio[name][r] if r >= 0 else 99.0
        out = {"kv": 8, "skipped": 0.25, "prefill": t / 2, "decode": t / 2, "generate": t,
               "prefill_cpu": 2 * t / 2, "decode_cpu": 2 * t / 2, "generate_cpu": 2 * t}
        if count_flops:
            out.update(flop_fraction=0.8, flop_fraction_prefill=0.7, flop_fraction_decode=0.9)
        return out

    monkeypatch.setattr(speed, "_run_pool", fake_run_pool)
    rows = {r.setting: r for r in compare_settings({n: (m, None) for n, m in models.items()},
                                                   torch.zeros(2, 3, dtype=torch.long), 2, 4, repeats=5)}
    assert [n for n, _ in calls] == ["dense", "a", "b"] * 6
    assert [f for _, f in calls] == [True] * 3 + [False] * 15
    a = rows["a"]
    assert a.speedup == statistics.median(ratio["a"]) and (a.speedup_ci_low, a.speedup_ci_high) == (0.9, 1.5)
    assert a.cpu_speedup == a.speedup and a.speedup_decode == a.speedup and a.ci_coverage == 1 - 2 / 32
    assert rows["b"].speedup == rows["b"].speedup_ci_low == rows["b"].speedup_ci_high == 2.0
    assert rows["dense"].speedup == 1.0
    assert a.generate_s == statistics.median(b / r for b, r in zip(base, ratio["a"]))
    assert (a.flop_fraction, a.flop_fraction_prefill, a.flop_fraction_decode) == (0.8, 0.7, 0.9)
    assert a.repeats == 5 and a.threads == torch.get_num_threads()
    with pytest.raises(ValueError, match="baseline 'c'"):
        compare_settings({"a": (models["a"], None)}, torch.zeros(2, 3, dtype=torch.long), 2, 4, baseline="c")


def test_generation_length_is_fixed_even_when_the_model_emits_eos():
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    first = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[:, -1]
    model.generation_config.eos_token_id = int(first[0])  # greedy decoding would stop at once
    stopped = model.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert stopped.shape[1] < 6 + 5  # without min_new_tokens the row ends early
    result = speed.timed_generate(model, ids[:1], 5)  # raises unless exactly 5 tokens were made
    assert set(result) >= {"prefill", "decode", "generate", "prefill_cpu", "decode_cpu", "generate_cpu"}


def test_real_tiny_settings_report_flops_kv_and_skipping():
    dense = tiny_model("llama")
    routed = attach_routers(tiny_model("llama"), RouterConfig(target="attn", level="sequence", num_layers=2))
    static = attach_static_drop(tiny_model("llama"), "attn", [1, 2])
    prompts = torch.randint(1, 96, (4, 8), generator=torch.Generator().manual_seed(0))
    rows = {r.setting: r for r in compare_settings(
        {"dense": (dense, None), "static": (static, None), "routed (masked)": (routed, "masked")},
        prompts, batch_size=2, new_tokens=3, repeats=1)}
    assert rows["dense"].flop_fraction == rows["routed (masked)"].flop_fraction == 1.0
    s = rows["static"]
    assert 0 < s.flop_fraction_prefill < 1 and 0 < s.flop_fraction_decode < 1
    assert min(s.flop_fraction_prefill, s.flop_fraction_decode) < s.flop_fraction < max(
        s.flop_fraction_prefill, s.flop_fraction_decode) or s.flop_fraction_prefill == s.flop_fraction_decode
    assert s.kv_bytes == rows["dense"].kv_bytes * 4 // 6  # 2 of 6 layers write no K/V
    assert s.skipped_share == pytest.approx(2 / 6)
    assert all(r.repeats == 1 and r.ci_coverage == 0.0 for r in rows.values())


@pytest.fixture
def keep_threads():
    """Restores torch's thread count after the test: the benchmarks' ``main(["--threads", ...])`` sets it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def benchmark(name: str = "speed"):
    """``benchmarks/<name>.py`` as a module."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_smoke_runs_every_setting_end_to_end(tmp_path, keep_threads):
    bench = benchmark()
    # one thread: on a busy machine each op of a multi-threaded tiny model waits for a scheduler slot
    table = bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    dense_names = {"dense", *(f"{t}_{lv}{m}" for t in bench.TARGETS for lv in bench.LEVELS for m in ("", " masked")),
                   *(f"{t} static drop" for t in bench.TARGETS)}
    assert set(table[table.model == "smollm2-135m"].setting) == dense_names
    assert set(table[table.model == bench.MOE].setting) == {"dense", "experts_token", "experts_token masked",
                                                            "expert drop"}
    real = table[table.setting.isin([f"{t}_{lv}" for t in bench.TARGETS for lv in bench.LEVELS])]
    assert (real.skipped_share > 0).all() and (real.flop_fraction < 1).all()
    assert (table[table.setting.str.endswith("masked")].flop_fraction == 1.0).all()
    assert table[table.setting == "attn_sequence"].vs_static.notna().all()
    for suffix in (".csv", ".md", ".json", "_summary.md"):
        assert (tmp_path / f"speed_smoke_cpu{suffix}").is_file()
    assert json.loads((tmp_path / "run.json").read_text())["torch_threads"] == 1


def test_benchmark_settings_times_only_the_named_settings_beside_dense(tmp_path, keep_threads):
    bench = benchmark()
    table = bench.main(["--smoke", "--threads", "1", "--no-moe", "--targets", "attn", "--settings", "attn_token",
                        "attn static drop", "--out", str(tmp_path)])
    assert list(table.setting) == ["dense", "attn_token", "attn static drop"]
    assert table[table.setting == "attn_token"].vs_static.notna().all()
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['mlp_token'\].*attn_sequence"):
        bench.main(["--smoke", "--no-moe", "--targets", "attn", "--settings", "mlp_token", "--out", str(tmp_path)])


def test_profile_smoke_groups_every_phase_of_every_setting(tmp_path, keep_threads):
    profiler = benchmark("profile_speed")
    table = profiler.main(["--smoke", "--threads", "1", "--settings", "dense", "attn_token", "attn static drop",
                           "--out", str(tmp_path)])
    assert profiler.group_of("aten::index_select") == "routing bookkeeping"
    assert profiler.group_of("aten::mm") == "matmul" and profiler.group_of("aten::view") == "other"
    for (setting, phase), rows in table.groupby(["setting", "phase"]):
        total = rows[rows.group == "total"].ms.item()
        assert total > 0 and rows[rows.group != "total"].ms.sum() == pytest.approx(total), (setting, phase)
    assert (table[table.setting == "dense"]["minus dense ms"] == 0).all()
    for suffix in (".csv", ".md", ".json", "_ops.md"):
        assert (tmp_path / f"profile_smoke_b8_t16{suffix}").is_file()


def test_profile_pool_calibrates_on_every_prompt_and_sums_their_batches(tmp_path, keep_threads):
    profiler = benchmark("profile_speed")
    one = profiler.main(["--smoke", "--threads", "1", "--settings", "dense", "attn_sequence", "--batch-size", "1",
                         "--out", str(tmp_path)])
    pooled = profiler.main(["--smoke", "--threads", "1", "--settings", "dense", "attn_sequence", "--batch-size",
                            "1", "--pool", "4", "--out", str(tmp_path)])
    assert (tmp_path / "profile_smoke_b1_t16.csv").is_file() and (tmp_path / "profile_smoke_b1_t16_pool4.csv").is_file()
    assert set(pooled.setting) == {"dense", "attn_sequence"}

    def dense_calls(table):  # operator calls of dense prefills: deterministic, one batch's worth per prompt here
        return table[(table.setting == "dense") & (table.phase == "prefill") & (table.group == "total")].calls.item()

    assert dense_calls(pooled) == 4 * dense_calls(one) > 0
    with pytest.raises(SystemExit):
        profiler.main(["--smoke", "--settings", "dense", "--batch-size", "2", "--pool", "3", "--out", str(tmp_path)])


def test_profile_moe_profiles_expert_routers_and_expert_drop(tmp_path, keep_threads):
    profiler = benchmark("profile_speed")
    table = profiler.main(["--smoke", "--threads", "1", "--model", "random-olmoe", "--settings", "dense",
                           "experts_token", "experts_token masked", "expert drop", "--batch-size", "1",
                           "--pool", "2", "--out", str(tmp_path)])
    assert set(table.setting) == {"dense", "experts_token", "experts_token masked", "expert drop"}
    assert (tmp_path / "profile_smoke-random-olmoe_b1_t16_pool2.csv").is_file()  # not the dense smoke run's name


def test_row_scaling_smoke_times_every_row_count_against_the_full_batch(tmp_path, keep_threads):
    rows = benchmark("row_scaling")
    table = rows.main(["--smoke", "--threads", "1", "--batch-size", "4", "--repeats", "2", "--new-tokens", "3",
                       "--out", str(tmp_path)])
    assert list(table["rows"]) == [1, 2, 3, 4]
    full = table[table["rows"] == 4].iloc[0]
    assert full.prefill_vs_full == 1.0 and full.decode_vs_full == 1.0  # the full batch against itself, every round
    assert (table.prefill_s > 0).all() and (table.decode_s > 0).all()
    assert ((table.decode_ci_low <= table.decode_vs_full) & (table.decode_vs_full <= table.decode_ci_high)).all()
    for suffix in (".csv", ".md", ".json"):
        assert (tmp_path / f"row_scaling_smoke_b4_t16{suffix}").is_file()
    with pytest.raises(SystemExit, match="include the batch size 4"):
        rows.main(["--smoke", "--batch-size", "4", "--rows", "1", "2", "--out", str(tmp_path)])
