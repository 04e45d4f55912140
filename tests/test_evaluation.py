"""Evaluation harness: prompts vs lm-eval, scoring engine equivalences, subsets, cache, bootstrap, fidelity."""

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from routertune_lib import evaluation as ev
from routertune_lib.routing import RouterConfig, attach_routers

ROOT = Path(__file__).resolve().parents[1]


def char_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """Character-level tokenizer with 96 ids: <pad>, <unk>, newline, ' '..'|'."""
    vocab = {"<pad>": 0, "<unk>": 1, "\n": 2}
    for c in range(32, 125):
        vocab[chr(c)] = len(vocab)
    assert len(vocab) == 96
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    kw = dict(unk_token="<unk>", eos_token="<unk>")
    if pad:
        kw["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def random_requests(seed=0, n_ctx=5, vocab=96):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n_ctx):
        ctx = torch.randint(3, vocab, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            cont = torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            reqs.append((ctx, cont))
    reqs.append((reqs[0][0][:3], [5]))  # a 1-token continuation on a short context
    return reqs


def reference_logliks(model, reqs):
    """Each context + continuation alone, full logits, no padding."""
    out = []
    with torch.no_grad():
        for ctx, cont in reqs:
            ids = torch.tensor([ctx + cont[:-1]])
            lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, len(ctx) - 1 :]
            out.append(float(lp.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return np.array(out)


# ---------------------------------------------------------------------------------------------------------------
# scoring engine


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_shared_context_equals_separate_and_full_logits(arch):
    model = tiny_model(arch)
    reqs = random_requests()
    ref = reference_logliks(model, reqs)
    shared = np.array([ll for ll, _ in ev.loglikelihoods(model, reqs, batch_size=3, share_context=True)])
    sep = np.array([ll for ll, _ in ev.loglikelihoods(model, reqs, batch_size=4, share_context=False)])
    np.testing.assert_allclose(shared, ref, atol=1e-4)
    np.testing.assert_allclose(sep, ref, atol=1e-4)


def test_batching_and_order_do_not_change_results():
    model = tiny_model("llama")
    reqs = random_requests(seed=3)
    base = ev.loglikelihoods(model, reqs, batch_size=16)
    perm = np.random.default_rng(0).permutation(len(reqs))
    shuffled = ev.loglikelihoods(model, [reqs[i] for i in perm], batch_size=2)
    for k, i in enumerate(perm):
        assert abs(shuffled[k][0] - base[i][0]) < 1e-4 and shuffled[k][1] == base[i][1]


def fewshot_like_requests(seed=0, vocab=96):
    """Contexts that share a long prefix (like MMLU's first_n few-shot examples), two families and loose ones."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    reqs = []
    for prefix in (rand(30), rand(24)):
        for _ in range(5):
            ctx = prefix + rand(int(torch.randint(1, 9, (1,), generator=g)))
            reqs += [(ctx, rand(int(torch.randint(1, 5, (1,), generator=g)))) for _ in range(3)]
    reqs += [(rand(12), rand(3)), (rand(7), [5])]
    return reqs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_shared_prefix_families_equal_separate_sequences(arch):
    model = tiny_model(arch)
    reqs = fewshot_like_requests()
    families = ev.prefix_families(sorted({tuple(c) for c, _ in reqs}), min_prefix=4)
    assert sorted(P for P, _ in families) == [0, 24, 30]  # two families and the loose contexts
    shared = [ll for ll, _ in ev.loglikelihoods(model, reqs, batch_size=3, forward_cost=4)]
    np.testing.assert_allclose(shared, reference_logliks(model, reqs), atol=1e-4)


@pytest.mark.parametrize("level,static,shares", [("token", False, True), ("sequence", True, True),
                                                 ("sequence", False, False)])
def test_shared_prefix_with_routers(level, static, shares):
    """Token-level routers and static drop share prefixes exactly; trained sequence-level routers decide on the whole
    context, so their contexts are not split (results equal scoring each request alone)."""
    model = attach_routers(tiny_model("llama"), RouterConfig(target="attn", level=level, num_layers=3),
                           static_drop=static)
    torch.manual_seed(1)
    for layer in model.model.layers:
        if getattr(layer, "router", None) is not None:
            torch.nn.init.normal_(layer.router.weight, std=2.0)
    assert ev.prefix_sharing_exact(model, 100) is shares
    reqs = fewshot_like_requests(seed=1)
    shared = [ll for ll, _ in ev.loglikelihoods(model, reqs, batch_size=4, forward_cost=4)]
    single = [ev.loglikelihoods(model, [r])[0][0] for r in reqs]
    np.testing.assert_allclose(shared, single, atol=1e-4)


def test_no_prefix_sharing_past_a_sliding_window():
    model = tiny_model("gemma3")
    window = model.config.get_text_config().sliding_window
    assert ev.prefix_sharing_exact(model, window // 2) and not ev.prefix_sharing_exact(model, window // 2 + 1)


def test_forward_cost_only_changes_chunking():
    """One forward per request (cost 0) and the fewest forwards (huge cost) give the same scores and greedy flags."""
    model = tiny_model("llama")
    reqs = random_requests(seed=4, n_ctx=8)
    for share in (True, False):
        many = ev.loglikelihoods(model, reqs, batch_size=8, share_context=share, forward_cost=0)
        few = ev.loglikelihoods(model, reqs, batch_size=8, share_context=share, forward_cost=1e9)
        np.testing.assert_allclose([ll for ll, _ in many], [ll for ll, _ in few], atol=1e-4)
        assert [g for _, g in many] == [g for _, g in few]


def test_length_chunks_is_optimal_and_bounded():
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(40):
        lengths = sorted(rng.integers(1, 200, size=int(rng.integers(1, 9))).tolist(), reverse=True)
        max_tokens, max_rows, cost = int(rng.integers(1, 600)), int(rng.integers(1, 6)), float(rng.integers(0, 100))
        chunks = ev.length_chunks(lengths, max_tokens, cost, max_rows)
        assert [i for c in chunks for i in c] == list(range(len(lengths)))  # consecutive, nothing lost
        ok = lambda c: len(c) <= max_rows and (len(c) == 1 or len(c) * lengths[c[0]] <= max_tokens)  # noqa: E731
        assert all(ok(c) for c in chunks)
        total = lambda cs: sum(cost + len(c) * lengths[c[0]] for c in cs)  # noqa: E731
        brute = math.inf
        for cuts in itertools.product([0, 1], repeat=len(lengths) - 1):  # every way to cut the sorted list
            bounds = [0] + [k + 1 for k, c in enumerate(cuts) if c] + [len(lengths)]
            cs = [range(a, b) for a, b in zip(bounds, bounds[1:])]
            if all(ok(c) for c in cs):
                brute = min(brute, total(cs))
        assert total(chunks) == pytest.approx(brute)


def test_truncation_keeps_last_tokens():
    model = tiny_model("llama")
    ctx, cont = list(range(3, 40)), [7, 8]
    (ll, _), = ev.loglikelihoods(model, [(ctx, cont)], max_length=10)
    (ref, _), = ev.loglikelihoods(model, [(ctx[-9:], cont)], max_length=100)
    assert abs(ll - ref) < 1e-5


@pytest.mark.parametrize("target,level", [("attn", "sequence"), ("block", "sequence"), ("attn", "token")])
def test_routed_shared_context_cache_expansion(target, level):
    """Expanding a (compact) routed cache to one row per choice == scoring each request on its own."""
    model = attach_routers(tiny_model("llama"), RouterConfig(target=target, level=level, num_layers=3))
    torch.manual_seed(1)
    for layer in model.model.layers:
        if getattr(layer, "router", None) is not None:
            torch.nn.init.normal_(layer.router.weight, std=2.0)
    reqs = random_requests(seed=5, n_ctx=6)
    stats = ev.RoutingStats()
    batched = [ll for ll, _ in ev.loglikelihoods(model, reqs, batch_size=4, stats=stats)]
    single = [ev.loglikelihoods(model, [r])[0][0] for r in reqs]
    np.testing.assert_allclose(batched, single, atol=1e-4)
    frac = stats.summary()["overall"]
    assert 0.0 < frac < 1.0  # some inputs skipped, some executed
    if level == "token":  # token decisions are causal: shared == whole-sequence scoring
        sep = [ll for ll, _ in ev.loglikelihoods(model, reqs, share_context=False)]
        np.testing.assert_allclose(batched, sep, atol=1e-4)


def test_zero_routers_equal_dense():
    dense = tiny_model("llama")
    routed = attach_routers(tiny_model("llama"), RouterConfig(level="sequence"))
    reqs = random_requests(seed=2)
    a = [ll for ll, _ in ev.loglikelihoods(dense, reqs)]
    stats = ev.RoutingStats()
    b = [ll for ll, _ in ev.loglikelihoods(routed, reqs, stats=stats)]
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert stats.summary()["overall"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# tokenization, prompts


def test_encode_pair_moves_trailing_space_and_empty_context():
    tok = char_tokenizer()
    ctx, cont = ev.encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    ctx, cont = ev.encode_pair(tok, "", "ab")
    assert ctx == [tok.eos_token_id] and tok.decode(cont) == "ab"


def test_fewshot_format_and_sampler_are_lm_eval_like():
    task = ev.MC_TASKS["piqa"]
    pool = [{"goal": f"g{i}", "sol1": f"a{i}", "sol2": f"b{i}", "label": i % 2} for i in range(10)]
    s1, s2 = ev.FewshotSampler(task, pool, 1234, False), ev.FewshotSampler(task, pool, 1234, False)
    doc = {"goal": "G", "sol1": "x", "sol2": "y", "label": 0}
    ex = s1.sample(2, doc)
    assert ex == s2.sample(2, doc)  # seeded
    import random

    assert ex == random.Random(1234).sample(pool, 2)  # lm-eval: rnd.sample(fewshot_docs, n)
    ctx, cont = task.requests(doc, ex)[1]
    expect = "".join(f"Question: {e['goal']}\nAnswer: {e['sol1' if e['label'] == 0 else 'sol2']}\n\n" for e in ex)
    assert ctx == expect + "Question: G\nAnswer:" and cont == " y"
    # winogrande: partial scoring, few-shot examples show the gold-filled sentence
    wino = ev.MC_TASKS["winogrande"]
    d = {"sentence": "A beat B because _ was fast.", "option1": "A", "option2": "B", "answer": "1"}
    assert wino.requests(d) == [("A beat B because A", " was fast."), ("A beat B because B", " was fast.")]
    assert wino.example_text(d) == "A beat B because A was fast.\n\n"
    # first_n per subject with exclusion of nothing (dev != test)
    mmlu = ev.MC_TASKS["mmlu"]
    pool = [{"subject": s, "question": f"q{s}{i}", "choices": list("wxyz"), "answer": i % 4} for s in "ab" for i in range(6)]
    ex = ev.FewshotSampler(mmlu, pool, 0, False).sample(5, {"subject": "b"})
    assert [e["question"] for e in ex] == [f"qb{i}" for i in range(5)]


def test_subset_indices_seeded_and_whole_split(caplog):
    a = ev.subset_indices(1000, 30, 1234, "piqa")
    assert a == ev.subset_indices(1000, 30, 1234, "piqa") and a == sorted(a) and len(set(a)) == 30
    assert a != ev.subset_indices(1000, 30, 1, "piqa")
    with caplog.at_level("INFO"):
        assert ev.subset_indices(10, 50, 0, "rte") == list(range(10))
    assert "whole split" in caplog.text


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match="known tasks: .*hellaswag"):
        ev.evaluate(tiny_model(), char_tokenizer(), ["nope"], cache=False)


# ---------------------------------------------------------------------------------------------------------------
# evaluate() end to end on synthetic data


def _fake_rows(name, n):
    if name == "piqa":
        return [{"goal": f"Do thing {i}", "sol1": f"way {i}", "sol2": f"other way {i * 7}", "label": i % 2} for i in range(n)]
    if name == "winogrande":
        return [{"sentence": f"Tom told Ann that _ was late {i}.", "option1": "Tom", "option2": "Ann",
                 "answer": "12"[i % 2]} for i in range(n)]
    if name == "mmlu":
        return [{"question": f"What is {i}+1?", "subject": ["algebra", "anatomy"][i % 2],
                 "choices": [str(i), str(i + 1), str(i + 2), "x"], "answer": 1} for i in range(n)]
    raise KeyError(name)


@pytest.fixture
def fake_data(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path))
    calls = []

    def load_task(name, split="eval", subject=None):
        calls.append((name, split))
        return datasets.Dataset.from_list(_fake_rows(name, 40 if split == "eval" else 12))

    monkeypatch.setattr(ev._data, "load_task", load_task)
    return calls


def test_evaluate_end_to_end_cache_and_records(fake_data, tmp_path):
    model, tok = tiny_model(), char_tokenizer(pad=False)  # no pad token: handled
    tasks = ["piqa", "winogrande", "mmlu"]
    r1 = ev.evaluate(model, tok, tasks, num_fewshot={"piqa": 0, "winogrande": 2, "mmlu": 2}, limit=15, batch_size=4)
    assert set(r1.tasks) == set(tasks)
    for t in tasks:
        res = r1.tasks[t]
        assert res.n == 15 and not res.cached
        assert [r["doc_id"] for r in res.records] == ev.subset_indices(40, 15, 1234, t)
        rec = res.records[0]
        assert len(rec["loglik"]) == rec["num_choices"] == len(rec["byte_len"])
        assert res.metrics["acc"] == np.mean([r["acc"] for r in res.records])
    assert r1.tasks["mmlu"].chance == 0.25 and r1.tasks["piqa"].chance == 0.5
    assert set(r1.tasks["mmlu"].subtasks) == {"algebra", "anatomy"}
    assert r1.average is None and r1.partial_average is not None
    df = r1.to_dataframe()
    assert list(df.task) == tasks
    # cache hit on re-run, identical results
    r2 = ev.evaluate(model, tok, tasks, num_fewshot={"piqa": 0, "winogrande": 2, "mmlu": 2}, limit=15, batch_size=4)
    assert all(r.cached for r in r2.tasks.values())
    assert r2.tasks["piqa"].records == r1.tasks["piqa"].records
    assert list((tmp_path / "eval").glob("piqa-*.json"))
    # routers change the key
    routed = attach_routers(tiny_model(), RouterConfig())
    r3 = ev.evaluate(routed, tok, ["piqa"], num_fewshot=0, limit=15)
    assert not r3.tasks["piqa"].cached and r3.routing["overall"] == 1.0
    # save / load
    path = r1.save(tmp_path / "out" / "res.json")
    assert ev.EvalResults.load(path).tasks["mmlu"].metrics == r1.tasks["mmlu"].metrics
    # self-comparison
    cmp = ev.compare(r1, r2, n_boot=200)
    assert cmp["tasks"]["piqa"]["agreement"] == 1.0 and cmp["average"]["diff"] == 0.0
    assert ev.choice_agreement(r1, r2) == {t: 1.0 for t in tasks}


def test_held_out_prompts_never_repeat_a_calibration_prompt():
    from routertune_lib.evaluation import held_out_split

    prompts = ["a", "b", "c", "a", "d", "b"]  # HellaSwag's training split repeats contexts
    assert held_out_split(prompts, 2) == (["a", "b"], ["c", "d"])
    assert held_out_split(prompts[2:], 2) == (["c", "a"], ["d", "b"])


def test_task_prompts_are_zero_shot_contexts_of_the_fewshot_split(fake_data):
    prompts = ev.task_prompts(["piqa", "winogrande"], 7, seed=0)
    assert len(prompts) == 7
    assert all(p.startswith("Question: Do thing") for p in prompts[0::2])  # round robin: piqa, winogrande, ...
    assert all(p.startswith("Tom told Ann that") for p in prompts[1::2])
    assert ("piqa", "fewshot") in fake_data and ("winogrande", "fewshot") in fake_data
    assert ev.task_prompts(["piqa", "winogrande"], 7, seed=0) == prompts  # seeded
    assert len(ev.task_prompts("piqa", 100)) == 12  # capped by the pool
    with pytest.raises(ValueError, match="num_prompts"):
        ev.task_prompts("piqa", 0)


def test_bad_num_fewshot_and_batch_size_name_the_value(fake_data):
    model, tok = tiny_model(), char_tokenizer()
    with pytest.raises(ValueError, match=r"num_fewshot=-1 for task 'rte': pass an integer >= 0"):
        ev.evaluate(model, tok, ["rte", "mmlu"], num_fewshot=-1, cache=False)
    with pytest.raises(ValueError, match=r"num_fewshot=-2 for task 'piqa'"):
        ev.evaluate(model, tok, ["mmlu", "piqa"], num_fewshot={"piqa": -2}, cache=False)
    with pytest.raises(ValueError, match=r"num_fewshot=2.5 for task 'piqa'"):
        ev.evaluate(model, tok, ["piqa"], num_fewshot=2.5, cache=False)
    with pytest.raises(ValueError, match=r"batch_size=0: pass an integer >= 1"):
        ev.evaluate(model, tok, ["piqa"], batch_size=0, cache=False)
    assert fake_data == []  # all rejected before any data or model work
    # more shots than the few-shot pool (12 rows): piqa draws n + 1 and drops the evaluated doc
    with pytest.raises(ValueError, match=r"piqa: num_fewshot=12 needs 13 examples, its few-shot pool has 12: "
                                         r"pass num_fewshot <= 11"):
        ev.evaluate(model, tok, ["piqa"], num_fewshot=12, limit=2, cache=False)
    # MMLU's first_n pool is the subject's dev examples (6 per subject here)
    with pytest.raises(ValueError, match=r"mmlu: num_fewshot=7 needs 7 examples, its few-shot pool of '(algebra|anat"
                                         r"omy)' has 6: pass num_fewshot <= 6"):
        ev.evaluate(model, tok, ["mmlu"], num_fewshot=7, limit=2, cache=False)


def test_acc_and_acc_norm_from_fixed_loglikelihoods(monkeypatch, tmp_path):
    """Hand-computed acc / acc_norm from fixed log-likelihoods; acc_norm divides by the choice's characters."""
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path))
    rows = {
        "piqa": [{"goal": "g0", "sol1": "ab", "sol2": "abcdefgh", "label": 1},
                 {"goal": "g1", "sol1": "abcd", "sol2": "a", "label": 0},
                 {"goal": "g2", "sol1": "xyz", "sol2": "xyzw", "label": 0}],
        "winogrande": [{"sentence": f"Tom met Ann and _ smiled {i}.", "option1": "Tom", "option2": "Ann",
                        "answer": a} for i, a in enumerate("211")],
    }
    monkeypatch.setattr(ev._data, "load_task", lambda name, split="eval", subject=None: datasets.Dataset.from_list(
        rows[name]))
    fixed = {"piqa": [-4.0, -8.0, -6.0, -2.0, -1.0, -5.0], "winogrande": [-3.0, -1.0, -2.0, -5.0, -4.0, -3.0]}
    seen = {}

    def fake_loglikelihoods(model, requests, desc, **kw):
        seen[desc] = requests
        return [(ll, False) for ll in fixed[desc]]

    monkeypatch.setattr(ev.evaluator, "loglikelihoods", fake_loglikelihoods)
    res = ev.evaluate(tiny_model(), char_tokenizer(), ["piqa", "winogrande"], num_fewshot=0, cache=False)
    piqa = res.tasks["piqa"]
    # acc: argmax of [-4, -8], [-6, -2], [-1, -5] = 0, 1, 0 against gold 1, 0, 0
    # acc_norm: argmax of [-4/2, -8/8], [-6/4, -2/1], [-1/3, -5/4] = 1, 0, 0
    assert [r["pred"] for r in piqa.records] == [0, 1, 0] and [r["pred_norm"] for r in piqa.records] == [1, 0, 0]
    assert piqa.metrics == {"acc": 1 / 3, "acc_norm": 1.0} and piqa.score == 1.0
    assert [r["chosen"] for r in piqa.records] == [1, 0, 0]  # the metric's (acc_norm) choice
    # WinoGrande, partial scoring: one context per option (the sentence up to the blank, filled in), the rest of the
    # sentence as the shared continuation; acc = argmax of [-3, -1], [-2, -5], [-4, -3] = 1, 0, 1 against 1, 0, 0
    wino = res.tasks["winogrande"]
    reqs = seen["winogrande"]
    assert all(reqs[2 * i][1] == reqs[2 * i + 1][1] and reqs[2 * i][0] != reqs[2 * i + 1][0] for i in range(3))
    assert [r["gold"] for r in wino.records] == [1, 0, 0] and [r["pred"] for r in wino.records] == [1, 0, 1]
    assert wino.metrics["acc"] == 2 / 3 and wino.score == 2 / 3


def _synthetic(correct: list[float]) -> ev.EvalResults:
    recs = [{"task": "piqa", "doc_id": i, "acc_norm": c, "acc": c, "chosen": int(c)} for i, c in enumerate(correct)]
    r = ev.TaskResult("piqa", "acc_norm", 0, len(recs), {"acc_norm": float(np.mean(correct))}, {}, 0.5, recs)
    return ev.EvalResults({"piqa": r}, {})


def test_paired_bootstrap_ci():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 300).astype(float).tolist()
    same = ev.compare(_synthetic(a), _synthetic(a), n_boot=2000)["tasks"]["piqa"]
    assert same["ci_low"] <= 0.0 <= same["ci_high"]
    noisy = [1.0 - x if rng.random() < 0.1 else x for x in a]  # random flips both ways: no real difference
    d = ev.compare(_synthetic(a), _synthetic(noisy), n_boot=2000)["tasks"]["piqa"]
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    better = [1.0 if rng.random() < 0.5 else x for x in a]  # strictly better on ~25% of examples
    d = ev.compare(_synthetic(a), _synthetic(better), n_boot=2000)
    assert d["tasks"]["piqa"]["ci_low"] > 0 and d["average"]["ci_low"] > 0


# ---------------------------------------------------------------------------------------------------------------
# generation, perplexity, KL


def test_generative_task_and_generate_until(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path))
    rows = [{"question": f"Calculate {i} + 1 =", "answer": str(i + 1)} for i in range(12)]
    task = dataclasses.replace(ev.GEN_TASKS["arithmetic"], load=lambda split: rows, max_new_tokens=6)
    monkeypatch.setitem(ev.TASK_REGISTRY, "arithmetic", task)
    model, tok = tiny_model(), char_tokenizer()
    res = ev.evaluate(model, tok, ["arithmetic"], num_fewshot=2, limit=5, batch_size=2).tasks["arithmetic"]
    assert res.n == 5 and res.metric == "exact_match" and 0.0 <= res.score <= 1.0
    assert all("\n" not in r["generation"] for r in res.records)
    assert ev.normalize_answer("The answer is #### 1,234.") == "1234"


def test_perplexity_and_kl():
    model, tok = tiny_model(), char_tokenizer()
    texts = ["hello world, this is a test.", "another line of text here!"]
    full = ev.perplexity(model, tok, texts, max_length=64)
    ids = torch.tensor([ev.tok_encode(tok, "\n\n".join(texts))])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits, -1)[0, :-1].gather(-1, ids[0, 1:, None])
    assert abs(full["nll"] + float(lp.mean())) < 1e-5 and full["tokens"] == ids.shape[1] - 1
    strided = ev.perplexity(model, tok, texts, max_length=16, stride=8)
    assert strided["tokens"] == full["tokens"] and np.isfinite(strided["ppl"])
    assert ev.mean_kl(model, model, tok, texts) < 1e-8
    routed = attach_routers(tiny_model(), RouterConfig(target="block", level="token"))
    for layer in routed.model.layers:
        if getattr(layer, "router", None) is not None:
            torch.nn.init.normal_(layer.router.weight, std=2.0)
    kl = ev.mean_kl(routed, routed, tok, texts, dense_context=lambda: ev.all_layers_executed(routed))
    assert abs(kl - ev.mean_kl(model, routed, tok, texts)) < 1e-5 and kl > 0


# ---------------------------------------------------------------------------------------------------------------
# real data / lm-eval


LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def _render(field, doc):
    """lm-eval's field semantics: a function, a list, a doc key, or a Jinja template (``apply_template``)."""
    import ast

    from lm_eval.utils import apply_template

    if callable(field):
        return field(doc)
    if isinstance(field, list):
        return field
    if field in doc:
        return doc[field]
    out = apply_template(field, doc)
    return ast.literal_eval(out) if out[:1] in "[0123456789" else out


AGREEMENT_SCRIPT = ROOT / "benchmarks" / "lm_eval_agreement.py"


def agreement_script():
    """``benchmarks/lm_eval_agreement.py`` as a module (it exports our tasks for lm-eval)."""
    spec = importlib.util.spec_from_file_location("lm_eval_agreement", AGREEMENT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.data
@pytest.mark.skipif(not LM_EVAL, reason="lm_eval not installed")
@pytest.mark.parametrize("name", sorted(ev.MC_TASKS))
def test_prompts_match_lm_eval_templates(name):
    """Render lm-eval's own YAML (templates, process_docs, !functions, description) on real docs."""
    from lm_eval.tasks._yaml_loader import load_yaml

    _find_yaml = agreement_script()._find_yaml

    ours = ev.MC_TASKS[name]
    ds = ev._data.load_task(name)
    idx = ev.subset_indices(len(ds), 3, 0, name)
    _, docs = ev.task_docs(name, limit=3, seed=0)
    for doc, raw in zip(docs, ds.select(idx).to_list()):
        lm_name = f"mmlu_{raw['subject']}" if name == "mmlu" else name
        cfg = load_yaml(_find_yaml(lm_name))
        lm_doc = cfg["process_docs"](datasets.Dataset.from_list([raw]))[0] if "process_docs" in cfg else raw
        text = _render(cfg["doc_to_text"], lm_doc)
        choices = _render(cfg["doc_to_choice"], lm_doc)
        target = _render(cfg["doc_to_target"], lm_doc)
        desc = cfg.get("description", "")
        if ours.multiple_input:
            assert ours.requests(doc) == [(c, " " + target) for c in choices]
            assert ours.gold(doc) == text
        else:
            assert ours.requests(doc) == [(desc + text, " " + c) for c in choices]
            assert ours.gold(doc) == int(target)


@pytest.mark.data
@pytest.mark.skipif(not LM_EVAL, reason="lm_eval not installed")
@pytest.mark.parametrize("name", sorted(ev.MC_TASKS))
def test_fewshot_requests_equal_lm_eval_requests(name, tmp_path):
    """The exact strings lm-eval builds (few-shot examples drawn by its sampler, in its order) for 30 docs, at the
    paper's shots (3 for the 0-shot tasks, 25 for ARC)."""
    task = ev.MC_TASKS[name]
    shots = task.num_fewshot or 3
    theirs = agreement_script().lm_eval_requests(name, 30, 1234, shots, tmp_path)
    _, docs = ev.task_docs(name, 30, 1234)
    ours = ev.build_requests(task, docs, shots, ev.fewshot_sampler(task, shots, 1234))
    assert len(ours) == len(theirs) == 30
    for d, (mine, lm) in enumerate(zip(ours, theirs)):
        assert mine == lm, f"doc {d}"


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.data
@pytest.mark.skipif(not LM_EVAL, reason="lm_eval not installed")
@pytest.mark.parametrize("shots,tasks", [("0", "piqa,winogrande,mmlu"), ("paper", "mmlu,winogrande,hellaswag,arc_challenge")])
def test_lm_eval_agreement_identical_choices(tmp_path, shots, tasks):
    """benchmarks/lm_eval_agreement.py on SmolLM2: identical per-example choices on a few docs, 0-shot and at the
    paper's shots (MMLU 5, WinoGrande 5, HellaSwag 10, ARC-C 25)."""
    proc = subprocess.run(
        [sys.executable, str(AGREEMENT_SCRIPT), "--tasks", tasks,
         "--limit", "6", "--num-fewshot", shots, "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    res = json.loads((tmp_path / f"smollm2-135m_{shots}shot_limit6.json").read_text())
    assert sorted(res["tasks"]) == sorted(tasks.split(","))
    for task, row in res["tasks"].items():
        assert row["disagreements"] == 0, (task, row)
        assert row["max_abs_loglik_diff"] < 1e-2, (task, row)  # same requests: only float rounding differs
        assert abs(row["ours"] - row["lm_eval"]) < 1e-9
