"""``results/README.md``: its tables and quoted numbers are what ``routertune_lib.results_readme`` generates from the
result files (the README cannot drift from them)."""

import json
import shutil

import pandas as pd
import pytest

from routertune_lib import results_readme as rr

README = rr.ROOT / "results" / "README.md"


def test_readme_matches_result_files(capsys):
    assert rr.main(["--check"]) == 0, capsys.readouterr().out  # run `python -m routertune_lib.results_readme`


def test_every_generator_is_used():
    used = {(kind, name) for kind, name, _ in rr.MARKER.findall(README.read_text())}
    assert {("table", n) for n in rr.TABLES} | {("value", n) for n in rr.VALUES} == used


def test_edited_number_is_detected_and_regenerated(tmp_path, capsys):
    """A hand edit inside a marked value fails the check; regenerating restores the result file's number."""
    log = "results/00_quickstart/cpu/router-tuning/train_log.csv"
    (tmp_path / log).parent.mkdir(parents=True)
    shutil.copy(rr.ROOT / log, tmp_path / log)
    steps = int(pd.read_csv(tmp_path / log).step.max())
    readme = tmp_path / "results" / "README.md"
    readme.write_text(f"intro\n<!-- value:quickstart-steps -->{steps + 1}<!-- /value --> steps\n")
    assert rr.main(["--readme", str(readme), "--check"]) == 1
    assert "differs" in capsys.readouterr().out
    assert rr.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == f"intro\n<!-- value:quickstart-steps -->{steps}<!-- /value --> steps\n"


def test_table_block_names_its_sources():
    out = rr.render("<!-- table:quickstart-accuracy -->old<!-- /table -->")
    assert "Source: `results/00_quickstart/cpu/accuracy.csv`." in out and "-->old<!--" not in out
    assert "| ARC-Easy | routed − dense accuracy (points) | 200 |" in out


@pytest.mark.parametrize("text, message", [
    ("<!-- table:no_such -->x<!-- /table -->", "unknown table marker 'no_such'"),
    ("<!-- table:speed -->x", "no matching"),
    ("<!-- value:speed -->x<!-- /table -->", "no matching"),
])
def test_bad_markers_raise(text, message):
    with pytest.raises(ValueError, match=message):
        rr.render(text)


def test_missing_result_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="accuracy.csv"):
        rr.render("<!-- table:quickstart-accuracy --><!-- /table -->", tmp_path)


def test_verdict_and_ci_format():
    assert rr.ci(0.2777, -3.611, 4.1666) == "+0.3 [-3.6, +4.2]"
    assert [rr.verdict(*b) for b in ((-2.0, -0.1), (0.1, 2.0), (-1.0, 1.0), (0.0, 1.0))] == [
        "lower", "higher", "unresolved", "unresolved"]


def test_reproduce_total_sums_the_run_from_the_last_empty_cache_across_its_restarts(tmp_path):
    def invocation(cache: int, notebooks: dict) -> dict:
        return {"started": "2026-12-08T00:14:09+0000", "cache_files": {"routers": cache, "eval": cache},
                "run": {"git_commit": "abcdef0123", "cpu_model": "a CPU"}, "total_s": 0.0,
                "notebooks": [{"name": n, "status": s, "wall_s": w} for n, (s, w) in notebooks.items()]}

    first, *rest = rr.NOTEBOOKS
    runs = [invocation(5, {first: ("ran", 999.0)}),  # an earlier run on a full cache: not counted
            invocation(0, {first: ("ran", 100.0), rest[0]: ("running", None)}),  # stopped in the second notebook
            invocation(3, {first: ("skipped", None), **{n: ("ran", 10.0) for n in rest[:3]}})]
    path = tmp_path / rr.REPRODUCE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"runs": runs}))
    r = rr.Results(tmp_path)
    total = rr.VALUES["reproduce-total"](r)
    assert total.startswith("130 s (0.04 h) for 4 of 13 notebooks") and f"`{rest[3]}`" in total
    table = rr.TABLES["reproduce"](r)
    assert table.count("| ran |") == 4 and "| interrupted |" in table and "| 130 s |" in table and "999" not in table
    runs.append(invocation(0, {n: ("ran", 60.0) for n in rr.NOTEBOOKS}))  # a new run from an empty cache
    path.write_text(json.dumps({"runs": runs}))
    assert rr.VALUES["reproduce-total"](rr.Results(tmp_path)) == "780 s (0.22 h)"
    path.write_text(json.dumps({"runs": runs[:1]}))
    with pytest.raises(ValueError, match="no invocation started on an empty cache"):
        rr.VALUES["reproduce-total"](rr.Results(tmp_path))


def test_speed_target_counts_take_each_setting_once_at_its_latest_run(tmp_path, monkeypatch):
    def row(setting, speedup, vs_static=(float("nan"),) * 3):
        return {"model": "smollm2-135m", "batch_size": 1, "prompt_len": 128, "setting": setting,
                **dict(zip(("speedup", "speedup_ci_low", "speedup_ci_high"), speedup)),
                **dict(zip(("vs_static", "vs_static_ci_low", "vs_static_ci_high"), vs_static))}

    old = [row("dense", (1, 1, 1)), row("attn_token", (0.98, 0.95, 1.01), (0.90, 0.85, 0.93)),
           row("attn_token masked", (0.95, 0.93, 0.96)), row("attn static drop", (1.1, 1.05, 1.15))]
    new = [row("dense", (1, 1, 1)), row("attn_token", (1.02, 1.01, 1.03), (0.96, 0.955, 0.97))]
    (tmp_path / "results" / "speed").mkdir(parents=True)
    pd.DataFrame(old).to_csv(tmp_path / "results/speed/old.csv", index=False)
    pd.DataFrame(new).to_csv(tmp_path / "results/speed/new.csv", index=False)
    monkeypatch.setattr(rr, "SPEED", "results/speed/old")
    monkeypatch.setattr(rr, "SPEED_RUNS", {"new": ("a later run", "results/speed/new")})
    r = rr.Results(tmp_path)
    assert rr.table_speed_targets(r).count("| `old` |") == 2  # every run's rows, static drop and dense left out
    counts = rr.table_speed_target_counts(r).splitlines()[2:]
    assert counts == ["| 0.95 of static drop | met | 1 | `new` |", "| token level above dense | faster | 1 | `new` |",
                      "| masked within ±3% | missed | 1 | `old` |"]
