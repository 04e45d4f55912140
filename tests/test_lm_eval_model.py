"""The ``routertune`` lm-eval model type: registry, model_args, context-first routing, statistics, CLI, and agreement
with our harness on real documents."""

import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from routertune_lib import evaluation as ev  # noqa: E402
from routertune_lib.experiments import randomize_routers  # noqa: E402
from routertune_lib.lm_eval_model import RouterTuneLM, export_task, main  # noqa: E402
from routertune_lib.models import tiny_random_model  # noqa: E402
from routertune_lib.routing import RouterConfig, attach_routers, routed_layers, save_routers  # noqa: E402

SEQ_ATTN = RouterConfig(target="attn", level="sequence", num_layers=2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random SmolLM2-architecture model (real tokenizer) saved as a model directory, and a router
    checkpoint of random sequence-level attention routers for it."""
    root = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_random_model()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    attach_routers(model, SEQ_ATTN)
    randomize_routers(model, seed=0)
    save_routers(model, root / "routers.safetensors")
    return root


def _requests(tok):
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " a large city in Europe"),
             ("Two plus two equals", " four, as everyone knows"), ("Question: is the sky blue?\nAnswer:", " yes")]
    return [((c, x), *ev.encode_pair(tok, c, x)) for c, x in pairs]


def test_registered_and_built_from_model_args(tiny_dir):
    cls = get_model("routertune")
    assert cls is RouterTuneLM and issubclass(cls, HFLM)
    lm = cls.create_from_arg_string(
        f"pretrained={tiny_dir / 'model'},routers={tiny_dir / 'routers.safetensors'},mode=masked,threshold=0.6",
        {"batch_size": 4, "device": "cpu"})
    layers = routed_layers(lm.model)
    assert sorted(layers) == SEQ_ATTN.resolve_layers(lm.model.config.num_hidden_layers)
    assert all(layer.routing.threshold == 0.6 for layer in layers.values())
    assert lm.model.routertune.mode == "masked"
    assert lm.get_model_info()["routertune"]["threshold"] == 0.6


def test_bad_model_args_fail_clearly(tiny_dir):
    with pytest.raises(ValueError, match="needs routers"):
        RouterTuneLM(pretrained=str(tiny_dir / "model"), threshold=0.5, device="cpu")
    with pytest.raises(FileNotFoundError, match="no-such.safetensors"):
        RouterTuneLM(pretrained=str(tiny_dir / "model"), routers=str(tiny_dir / "no-such.safetensors"), device="cpu")
    with pytest.raises(ValueError, match="batch_size='auto'"):
        RouterTuneLM(pretrained=str(tiny_dir / "model"), batch_size="auto", device="cpu")
    with pytest.raises(ValueError, match="routing mode"):
        RouterTuneLM(pretrained=str(tiny_dir / "model"), routers=str(tiny_dir / "routers.safetensors"),
                     mode="fast", device="cpu")


def test_sequence_routers_decide_on_the_context_alone(tiny_dir):
    """Scores equal our engine with ``share_context=True``; lm-eval's plain HFLM on the same routed model equals
    ``share_context=False`` (the router sees the continuation too), and the two differ."""
    lm = RouterTuneLM(pretrained=str(tiny_dir / "model"), routers=str(tiny_dir / "routers.safetensors"),
                      threshold=0.5, device="cpu", batch_size=2)
    reqs = _requests(lm.tokenizer)
    pairs = [(c, x) for _, c, x in reqs]
    ours = lm._loglikelihood_tokens(reqs)
    shared = ev.loglikelihoods(lm.model, pairs, batch_size=2, max_length=lm.max_length, share_context=True,
                               pad_id=lm.tokenizer.pad_token_id)
    whole = ev.loglikelihoods(lm.model, pairs, batch_size=2, max_length=lm.max_length, share_context=False,
                              pad_id=lm.tokenizer.pad_token_id)
    plain = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=1)._loglikelihood_tokens(reqs)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in shared], abs=1e-4)
    assert [s for s, _ in plain] == pytest.approx([s for s, _ in whole], abs=1e-3)
    assert any(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(ours, plain)), "routing should see different inputs"
    routing = lm.get_model_info()["routertune"]["routing"]
    assert 0.0 < routing["overall"] < 1.0 and set(routing["layers"]) == set(routed_layers(lm.model))


def test_dense_scores_equal_hflm(tiny_dir):
    """Without routers the plug-in is HFLM: same log-likelihoods and greedy flags."""
    lm = RouterTuneLM(pretrained=str(tiny_dir / "model"), device="cpu", batch_size=2)
    reqs = _requests(lm.tokenizer)
    ours = lm._loglikelihood_tokens(reqs)
    theirs = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=1)._loglikelihood_tokens(reqs)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=1e-3)
    assert lm.get_model_info()["routertune"]["routing"] == {}


@pytest.mark.data
def test_cli_runs_a_local_task(tiny_dir, tmp_path):
    """``routertune-lm-eval export-tasks`` then ``routertune-lm-eval --model routertune ...`` (the console script's
    code, run as ``python -m``): results JSON with the metric and the routing statistics."""
    assert main(["export-tasks", "--tasks", "piqa", "--limit", "4", "--out", str(tmp_path / "tasks")]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "routertune_lib.lm_eval_model", "--model", "routertune", "--model_args",
         f"pretrained={tiny_dir / 'model'},routers={tiny_dir / 'routers.safetensors'},mode=real,threshold=0.5",
         "--tasks", "rtlocal_piqa", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob("results_*.json")
    res = json.loads(path.read_text())
    assert 0.0 <= res["results"]["rtlocal_piqa"]["acc,none"] <= 1.0
    assert 0.0 < res["config"]["routertune"]["routing"]["overall"] < 1.0


@pytest.mark.model
@pytest.mark.data
def test_metric_equals_our_harness_for_a_routed_model(tmp_path):
    """SmolLM2-135M with random sequence-level attention routers (8 layers, threshold 0.5), 20 ARC-Easy docs, 0-shot:
    lm-eval's acc and acc_norm through ``routertune`` equal ``evaluate``'s on the same docs, per document too, and
    so does the executed fraction."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from routertune_lib.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    attach_routers(model, RouterConfig(target="attn", level="sequence", num_layers=8))
    randomize_routers(model, seed=0)
    save_routers(model, tmp_path / "routers.safetensors")
    ours = ev.evaluate(model, tok, ["arc_easy"], num_fewshot=0, limit=20, seed=1234, batch_size=8, cache=False)
    made = export_task("arc_easy", 20, 1234, 0, tmp_path / "tasks")
    res = simple_evaluate(
        model="routertune", model_args={"pretrained": "smollm2-135m", "routers": str(tmp_path / "routers.safetensors"),
                                        "mode": "real", "threshold": 0.5},
        tasks=[made[0][0]], task_manager=TaskManager(include_path=str(tmp_path / "tasks")), num_fewshot=0,
        batch_size=8, device="cpu", log_samples=True, bootstrap_iters=0, random_seed=1234, numpy_random_seed=1234,
        torch_random_seed=1234, fewshot_random_seed=1234,
    )
    theirs = res["results"][made[0][0]]
    mine = ours.tasks["arc_easy"]
    assert theirs["acc,none"] == pytest.approx(mine.metrics["acc"], abs=1e-12)
    assert theirs["acc_norm,none"] == pytest.approx(mine.metrics["acc_norm"], abs=1e-12)
    by_id = {r["doc_id"]: r for r in mine.records}
    for s in res["samples"][made[0][0]]:
        rec = by_id[made[0][1][s["doc_id"]]]
        assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(rec["loglik"], abs=1e-3)
    routing = res["config"]["routertune"]["routing"]
    assert 0.0 < routing["overall"] < 1.0
    assert routing["overall"] == pytest.approx(ours.routing["overall"], abs=1e-9)
