"""Generative (exact-match) evaluation of routed models: routing statistics of generation, few-shot calibration
prompts, paired comparison of exact-match records, the arithmetic_plus stand-in task."""

import dataclasses

import numpy as np
import pytest
from conftest import tiny_model
from test_evaluation import char_tokenizer

from routertune_lib import evaluation as ev
from routertune_lib.baselines import attach_static_drop
from routertune_lib.routing import RouterConfig, attach_routers

ROWS = [{"question": f"Calculate {i} + 1 =", "answer": str(i + 1)} for i in range(12)]


@pytest.fixture
def arithmetic(monkeypatch, tmp_path):
    """A 12-row stand-in for the arithmetic task (few-shot pool = evaluated split), results cached under tmp_path."""
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path))
    task = dataclasses.replace(ev.GEN_TASKS["arithmetic"], load=lambda split: ROWS, max_new_tokens=4)
    monkeypatch.setitem(ev.TASK_REGISTRY, "arithmetic", task)
    return task


def _generate(model, n=5):
    return ev.evaluate(model, char_tokenizer(), ["arithmetic"], num_fewshot=2, limit=n, batch_size=2)


def test_generation_records_routing_decisions(arithmetic):
    dense = _generate(tiny_model())
    assert dense.routing == {} and dense.tasks["arithmetic"].routing == {}
    # zero routers: every sequence executes every routed layer; one sequence-level decision per prompt and layer
    zero = _generate(attach_routers(tiny_model(), RouterConfig(target="attn", level="sequence")))
    layers = RouterConfig().resolve_layers(6)
    assert zero.routing["overall"] == 1.0 and set(zero.routing["layers"]) == set(layers)
    assert all(tot == 5 for _, tot in zero.routing["counts"].values())
    assert [r["generation"] for r in zero.tasks["arithmetic"].records] == \
        [r["generation"] for r in dense.tasks["arithmetic"].records]  # zero routers compute the dense model
    # static drop of two layers: those never run, the others always
    drop = _generate(attach_static_drop(tiny_model(), "attn", layers[:2]))
    assert drop.routing["layers"] == {layers[0]: 0.0, layers[1]: 0.0}
    # token level: prefill tokens plus one decision per generated token
    token = _generate(attach_routers(tiny_model(), RouterConfig(target="attn", level="token")))
    assert all(tot > 5 for _, tot in token.routing["counts"].values())


def test_compare_works_on_exact_match_records(arithmetic):
    a = _generate(tiny_model(), n=8)
    b = _generate(attach_static_drop(tiny_model(), "attn", [2, 3]), n=8)
    cmp = ev.compare(a, b, n_boot=500)["tasks"]["arithmetic"]
    assert cmp["metric"] == "exact_match" and cmp["n"] == 8
    assert cmp["ci_low"] <= cmp["diff"] <= cmp["ci_high"]
    same = [ra["pred"] == rb["pred"] for ra, rb in zip(a.tasks["arithmetic"].records, b.tasks["arithmetic"].records)]
    assert cmp["agreement"] == pytest.approx(np.mean(same))
    assert ev.compare(a, a, n_boot=100)["average"]["diff"] == 0.0


def test_generative_cache_key_has_task_version(arithmetic, tmp_path):
    r1 = _generate(tiny_model())
    assert not r1.tasks["arithmetic"].cached
    assert _generate(tiny_model()).tasks["arithmetic"].cached
    ev.TASK_REGISTRY["arithmetic"] = dataclasses.replace(arithmetic, version="test")
    assert not _generate(tiny_model()).tasks["arithmetic"].cached


def test_task_prompts_few_shot_for_generative_tasks(arithmetic):
    zero = ev.task_prompts("arithmetic", 4, seed=3)
    assert all(p.startswith("Question: Calculate") and p.endswith("\nAnswer:") for p in zero)
    few = ev.task_prompts("arithmetic", 4, seed=3, num_fewshot=2)
    for z, f in zip(zero, few):  # same docs, two solved examples of other docs in front, the evaluation's format
        assert f.endswith("\n\n" + z) and f.count("Question:") == 3
        shots = f.split("\n\n")[:2]
        assert all(s.startswith("Question: Calculate") and "\nAnswer: " in s and z not in s for s in shots)
        assert f == arithmetic.prompt({"question": z[len("Question: "):-len("\nAnswer:")]},
                                      [ROWS[int(s.split()[2])] for s in shots])
    with pytest.raises(ValueError, match="num_fewshot"):
        ev.task_prompts("arithmetic", 4, num_fewshot=-1)


@pytest.mark.data
def test_arithmetic_plus_is_the_additions_of_two_digit_numbers():
    docs = ev.get_task("arithmetic_plus").load("eval")
    assert len(docs) == 462
    for d in docs:
        a, op, b = d["question"].split()[1:4]
        assert op == "+" and int(a) < 100 and int(b) < 100 and int(a) + int(b) == int(d["answer"])
