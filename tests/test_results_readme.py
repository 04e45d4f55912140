"""``results/README.md``: its tables and quoted numbers are what ``routertune_lib.results_readme`` generates from the
result files (the README cannot drift from them)."""

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
