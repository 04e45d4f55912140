"""Paired fidelity of a model to a cached reference: KL on the top-k coarsening, log-likelihood change, agreement,
held-out perplexity ratio and KL, bootstrap CIs."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_evaluation import char_tokenizer, fake_data  # noqa: F401  (fake_data: fixture of synthetic task data)
from test_generative_eval import arithmetic  # noqa: F401  (fixture: a 12-row stand-in arithmetic task)

from routertune_lib import evaluation as ev
from routertune_lib.evaluation.generation import generative_prompts
from routertune_lib.evaluation.reference import coarse_kl, coarse_logprobs

TEXTS = [f"The {i}th quick brown fox jumps over {i * 3} lazy dogs." for i in range(6)]


def perturbed(model, scale=0.05, seed=1):
    """A copy of ``model`` with Gaussian noise added to its last layer's MLP weights."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = other.model.layers[-1].mlp.down_proj.weight
        w += scale * torch.randn(w.shape, generator=g)
    return other


def exact_per_text(ref_model, model, tok, texts):
    """Per text, run alone with full logits: the exact KL(ref || model) averaged over the positions that predict a
    token, and both models' summed NLL of the text's tokens after the first."""
    kl, nll = [], []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([ev.tok_encode(tok, t)])
            p = torch.log_softmax(ref_model(input_ids=ids).logits.float(), -1)[0, :-1]
            q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1]
            kl.append(float((p.exp() * (p - q)).sum(-1).mean()))
            nll.append([-float(x.gather(-1, ids[0, 1:, None]).sum()) for x in (p, q)])
    return np.array(kl), np.array(nll)


def test_coarse_kl_by_hand_and_a_lower_bound():
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
    q = torch.tensor([[0.4, 0.4, 0.1, 0.1]]).log()
    index = torch.tensor([[0]])  # top-1 bucket and the tail: (0.5, 0.5) vs (0.4, 0.6)
    coarse = coarse_kl(coarse_logprobs(p, index), coarse_logprobs(q, index))
    assert float(coarse) == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6), abs=1e-7)
    exact = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    assert float(coarse_kl(p, q)) == pytest.approx(exact, abs=1e-7) and float(coarse) <= exact
    assert float(coarse_kl(p, p)) == 0.0


def test_model_against_itself_is_exactly_faithful(fake_data):
    model, tok = tiny_model(), char_tokenizer()
    ref = ev.reference_outputs(model, tok, ["piqa", "winogrande"], TEXTS, num_fewshot={"piqa": 0, "winogrande": 2},
                               limit=12, batch_size=4, topk=8)
    fid = ev.fidelity(model, tok, ref)
    for name in ("piqa", "winogrande"):
        m = fid.tasks[name]["metrics"]
        assert m["kl"]["value"] == 0.0 and m["agreement"]["value"] == 1.0 and m["delta_loglik"]["value"] == 0.0
        assert m["kl"]["n"] == 12 and m["kl"]["n_boot"] >= 1000
        assert all(r["tokens"] > 0 for r in fid.tasks[name]["records"])
    held = fid.tasks[ev.HELDOUT]["metrics"]
    assert held["ppl_ratio"]["value"] == 1.0 and held["kl"]["value"] == 0.0
    assert held["ppl"]["value"] == held["ref_ppl"]["value"]
    df = fid.to_dataframe()
    assert set(df.metric) >= {"kl", "agreement", "delta_loglik", "ppl_ratio"} and len(fid.records_dataframe()) == 30


def test_perturbed_model_against_exact_values(fake_data):
    model, tok = tiny_model(), char_tokenizer()
    other = perturbed(model)
    ref = ev.reference_outputs(model, tok, ["piqa"], TEXTS, num_fewshot=0, limit=12, batch_size=4, topk=4)
    fid = ev.fidelity(other, tok, ref)
    piqa = fid.tasks["piqa"]
    assert piqa["metrics"]["kl"]["value"] > 0 and piqa["metrics"]["kl"]["ci_low"] > 0
    assert any(r["delta_loglik"] != 0 for r in piqa["records"])
    # Δ log-likelihood = the two models' evaluate() records, gold choice, normalised by its length (acc_norm)
    a = ev.evaluate(model, tok, ["piqa"], num_fewshot=0, limit=12, cache=False).tasks["piqa"].records
    b = ev.evaluate(other, tok, ["piqa"], num_fewshot=0, limit=12, cache=False).tasks["piqa"].records
    want = [(y["loglik"][y["gold"]] - x["loglik"][x["gold"]]) / x["char_len"][x["gold"]] for x, y in zip(a, b)]
    np.testing.assert_allclose([r["delta_loglik"] for r in piqa["records"]], want, atol=1e-5)
    assert [r["agreement"] for r in piqa["records"]] == [float(x["chosen"] == y["chosen"]) for x, y in zip(a, b)]
    # held-out text: top-4 KL <= exact KL per text; with k >= vocabulary size the coarse KL is the exact one
    exact, nll = exact_per_text(model, other, tok, TEXTS)
    top4 = np.array([r["kl"] for r in fid.tasks[ev.HELDOUT]["records"]])
    assert (top4 <= exact + 1e-7).all() and (top4 > 0).all()
    full = ev.fidelity(other, tok, ev.reference_outputs(model, tok, (), TEXTS, topk=1000, cache=False))
    np.testing.assert_allclose([r["kl"] for r in full.tasks[ev.HELDOUT]["records"]], exact, rtol=1e-4, atol=1e-7)
    # perplexity ratio: exp of the token-weighted mean NLL difference, the perplexities of both models
    held = full.tasks[ev.HELDOUT]
    tokens = sum(len(ev.tok_encode(tok, t)) - 1 for t in TEXTS)
    ref_nll, nll = nll.sum(0)
    assert held["metrics"]["ppl_ratio"]["value"] == pytest.approx(math.exp((nll - ref_nll) / tokens), rel=1e-5)
    assert held["metrics"]["ref_ppl"]["value"] == pytest.approx(math.exp(ref_nll / tokens), rel=1e-5)
    assert held["metrics"]["ppl_ratio"]["ci_low"] <= held["metrics"]["ppl_ratio"]["value"]


def test_reference_outputs_are_cached_and_checked(fake_data, tmp_path):
    model, tok = tiny_model(), char_tokenizer()
    kw = dict(num_fewshot=0, limit=8, batch_size=4, topk=4)
    ref = ev.reference_outputs(model, tok, ["piqa"], **kw)
    assert len(list((tmp_path / "eval" / "reference").glob("piqa-*.pt"))) == 1
    again = ev.reference_outputs(model, tok, ["piqa"], **kw)
    assert again.tasks["piqa"]["records"] == ref.tasks["piqa"]["records"]
    assert torch.equal(again.tasks["piqa"]["coarse"], ref.tasks["piqa"]["coarse"])
    ref.tasks["piqa"]["requests"] = "0" * 16
    with pytest.raises(ValueError, match="requests differ from the reference's"):
        ev.fidelity(model, tok, ref)
    with pytest.raises(ValueError, match="n_boot >= 1000"):
        ev.fidelity(model, tok, again, n_boot=100)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        ev.reference_outputs(model, tok, ["nope"])


def test_fidelity_passes_are_cached_per_task_and_keyed_by_routers_and_thresholds(fake_data, tmp_path, monkeypatch):
    from routertune_lib.experiments import randomize_routers
    from routertune_lib.routing import RouterConfig, attach_routers, set_thresholds

    model, tok = tiny_model(), char_tokenizer()
    ref = ev.reference_outputs(model, tok, ["piqa"], TEXTS, num_fewshot=0, limit=8, batch_size=4, topk=4)
    routed = attach_routers(perturbed(model), RouterConfig(level="sequence", num_layers=3))
    randomize_routers(routed, seed=3)
    first = ev.fidelity(routed, tok, ref)
    assert len(list((tmp_path / "eval" / "fidelity").glob("*.pt"))) == 2  # piqa and the held-out texts
    calls = []
    real_scores = ev.reference._scores
    monkeypatch.setattr(ev.reference, "_scores", lambda *a, **k: calls.append(a[2]) or real_scores(*a, **k))
    again = ev.fidelity(routed, tok, ref, n_boot=2000)  # the bootstrap is recomputed from the cached pass
    assert calls == [] and again.records_dataframe().equals(first.records_dataframe())
    assert again.routing == first.routing and again.tasks["piqa"]["metrics"]["kl"]["n_boot"] == 2000
    fresh = ev.fidelity(routed, tok, ref, cache=False)
    assert calls == ["piqa", ev.HELDOUT] and fresh.records_dataframe().equals(first.records_dataframe())
    set_thresholds(routed, 0.6)  # another decision: another key, a new pass
    moved = ev.fidelity(routed, tok, ref)
    assert calls[2:] == ["piqa", ev.HELDOUT] and moved.routing != first.routing


def test_generative_task_fidelity_scores_the_gold_answer_after_the_generation_prompt(arithmetic):
    model, tok = tiny_model(), char_tokenizer()
    kw = dict(num_fewshot=2, limit=6, batch_size=4, topk=8)
    ref = ev.reference_outputs(model, tok, ["arithmetic"], **kw)
    same = ev.fidelity(model, tok, ref).tasks["arithmetic"]
    assert same["metrics"]["kl"]["value"] == 0.0 and same["metrics"]["delta_loglik"]["value"] == 0.0
    other = perturbed(model, scale=0.2)
    fid = ev.fidelity(other, tok, ref)
    assert fid.tasks["arithmetic"]["metrics"]["kl"]["ci_low"] > 0
    with pytest.raises(ValueError, match="no multiple-choice task"):
        fid.choice_frame()
    # the scored requests: each evaluated doc's generation prompt (as evaluate() builds it), then " " + gold answer
    task = ev.get_task("arithmetic")
    idx, docs, prompts = generative_prompts(task, 2, 6, 1234)
    gens = ev.evaluate(model, tok, ["arithmetic"], num_fewshot=2, limit=6, cache=False).tasks["arithmetic"].records
    assert [r["doc_id"] for r in gens] == [int(i) for i in idx] == [r["doc_id"] for r in fid.tasks["arithmetic"]["records"]]
    want = []
    with torch.no_grad():
        for p, d in zip(prompts, docs):
            ctx, cont = ev.encode_pair(tok, p, " " + task.doc_to_target(d))
            ids = torch.tensor([ctx + cont])
            lp = [torch.log_softmax(m(input_ids=ids).logits.float(), -1)[0, len(ctx) - 1 : -1] for m in (model, other)]
            want.append(float(sum(x.gather(-1, torch.tensor(cont)[:, None]).sum() for x in (lp[1], -lp[0]))))
    np.testing.assert_allclose([r["delta_loglik"] for r in fid.tasks["arithmetic"]["records"]], want, atol=1e-4)


def test_bootstrap_ci_contains_the_value_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        x = rng.normal(1.0, 1.0, n)
        ci = ev.bootstrap_ci(x, n_boot=2000, seed=0)
        assert ci["value"] == pytest.approx(x.mean()) and ci["ci_low"] < ci["value"] < ci["ci_high"]
        assert ci["n"] == n and ci["n_boot"] == 2000
        widths.append(ci["ci_high"] - ci["ci_low"])
    # the CI half-width of a mean is about 1.96 sd / sqrt(n)
    assert widths[1] < widths[0] / 3 and widths[1] == pytest.approx(2 * 1.96 / math.sqrt(800), rel=0.15)
    assert ev.bootstrap_ci(x, seed=1) != ev.bootstrap_ci(x, seed=2) and ev.bootstrap_ci(x) == ev.bootstrap_ci(x)
    with pytest.raises(ValueError, match="got 0 examples"):
        ev.bootstrap_ci([])


def test_choice_frame_accuracy_and_task_average_match_evaluate_and_compare(fake_data):
    """One fidelity pass gives each model's accuracy (as evaluate() scores it) and the paired accuracy difference
    to the reference with compare()'s CI; paired_rows of two passes gives their difference and a verdict."""
    from routertune_lib.studies.protocol import paired_rows

    model, tok = tiny_model(), char_tokenizer()
    other = perturbed(model, scale=0.5)
    tasks = ["piqa", "winogrande"]
    ref = ev.reference_outputs(model, tok, tasks, num_fewshot=0, limit=12, batch_size=4, topk=8, cache=False)
    fid = ev.fidelity(other, tok, ref)
    docs = fid.choice_frame()
    a = ev.evaluate(model, tok, tasks, num_fewshot=0, limit=12, cache=False)
    b = ev.evaluate(other, tok, tasks, num_fewshot=0, limit=12, cache=False)
    for name in tasks:
        assert docs.accuracy[name].mean() == pytest.approx(b.tasks[name].score)
        assert docs.ref_accuracy[name].mean() == pytest.approx(a.tasks[name].score)
    got = ev.task_average(docs.assign(d=docs.accuracy - docs.ref_accuracy), "d", n_boot=2000)
    want = ev.compare(a, b, n_boot=2000)["average"]
    assert (got["value"], got["ci_low"], got["ci_high"]) == pytest.approx((want["diff"], want["ci_low"], want["ci_high"]))
    assert fid.routing == {}  # a model without routers
    rows = {(r["task"], r["metric"]): r for r in paired_rows(fid, ev.fidelity(model, tok, ref), n_boot=1000)}
    kl = rows["average", "kl"]
    assert kl["diff"] == pytest.approx(docs.kl.groupby("task").mean().mean()) and kl["verdict"] == "reversed"
    assert rows["piqa", "accuracy"]["diff"] == pytest.approx(100 * (b.tasks["piqa"].score - a.tasks["piqa"].score))
