"""``routertune_lib.reproduce``: which executed notebooks count as finished (resume), and ``--only`` validation."""

import json
import logging
from pathlib import Path

import pytest

from routertune_lib import reproduce

EXECUTED = sorted((reproduce.ROOT / "notebooks" / "executed").glob("*/[0-9]*.ipynb"))


def _notebook(statuses=("completed", "completed"), exception=None, end_time="2026-01-01T00:00:00+00:00", error=False):
    """A notebook as papermill 2.7 writes it: notebook-level and per-cell ``papermill`` metadata."""
    cells = [{"cell_type": "code", "source": "x = 1", "execution_count": i + 1,
              "metadata": {"papermill": {"status": s, "exception": s == "failed"}},
              "outputs": [{"output_type": "error", "ename": "E", "evalue": "", "traceback": []}] if error else []}
             for i, s in enumerate(statuses)]
    return {"cells": cells, "metadata": {"papermill": {"end_time": end_time, "exception": exception}},
            "nbformat": 4, "nbformat_minor": 5}


def _write(path: Path, nb) -> Path:
    path.write_text(json.dumps(nb))
    return path


def test_success_with_exception_none_is_finished(tmp_path):
    # papermill 2.7.0 leaves the notebook's "exception" None on success (not False)
    assert reproduce.finished(_write(tmp_path / "a.ipynb", _notebook(exception=None)))
    assert reproduce.finished(_write(tmp_path / "b.ipynb", _notebook(exception=False)))


@pytest.mark.parametrize("executed", EXECUTED, ids=[f"{p.parent.name}/{p.stem}" for p in EXECUTED])
def test_committed_executed_notebooks_are_finished(executed):
    assert reproduce.finished(executed)


@pytest.mark.parametrize("nb", [
    _notebook(statuses=("completed", "failed", "pending"), exception=True),  # a cell raised
    _notebook(statuses=("completed", "running", "completed")),  # interrupted: papermill completes pending cells
    _notebook(end_time=None, statuses=("completed", "pending")),  # still running, or killed
    _notebook(error=True),  # an error output without papermill's flags
    _notebook(statuses=()),
    {"cells": [], "metadata": {}},  # not run by papermill
], ids=["failed", "interrupted", "no_end_time", "error_output", "no_cells", "no_papermill"])
def test_unfinished(tmp_path, nb):
    assert not reproduce.finished(_write(tmp_path / "a.ipynb", nb))


def test_missing_is_unfinished(tmp_path):
    assert not reproduce.finished(tmp_path / "missing.ipynb")


@pytest.mark.parametrize("text", ['{"cells": [{"cell_type": "code", "sou', "[]", "\xff\xfe"])
def test_unreadable_is_unfinished_with_warning(tmp_path, caplog, text):
    path = tmp_path / "a.ipynb"
    path.write_bytes(text.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="routertune.reproduce"):
        assert not reproduce.finished(path)
    assert "a.ipynb" in caplog.text and "unfinished" in caplog.text


@pytest.fixture
def fake_notebooks(tmp_path, monkeypatch):
    """``notebooks/{00_a,01_b}.ipynb``; executing one records its name and writes a finished copy."""
    import papermill

    src = tmp_path / "notebooks"
    src.mkdir()
    for name in ("00_a", "01_b"):
        _write(src / f"{name}.ipynb", _notebook())
    ran = []

    def execute(nb, out, **kwargs):
        ran.append(Path(nb).stem)
        _write(Path(out), _notebook())

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(reproduce, "check_parameters", lambda nb, params: None)
    return src, ran


def test_resume_skips_finished_notebooks(fake_notebooks, tmp_path):
    src, ran = fake_notebooks
    out = tmp_path / "executed"
    out.mkdir()
    _write(out / "00_a.ipynb", _notebook(exception=None))
    _write(out / "01_b.ipynb", _notebook(statuses=("completed", "failed"), exception=True))
    done = reproduce.run_notebooks("cpu", src, out_dir=out)
    assert ran == ["01_b"] and [p.name for p in done] == ["00_a.ipynb", "01_b.ipynb"]
    assert reproduce.run_notebooks("cpu", src, out_dir=out, force=True) and ran == ["01_b", "00_a", "01_b"]


def test_only_selects(fake_notebooks, tmp_path):
    src, ran = fake_notebooks
    done = reproduce.run_notebooks("cpu", src, only=["01_b"], out_dir=tmp_path / "x")
    assert [p.name for p in done] == ["01_b.ipynb"]
    assert ran == ["01_b"]


@pytest.mark.parametrize("only, message", [([], "at least one notebook name"), (["01_b", "no_such"], "'no_such'")])
def test_only_bad_names_raise(fake_notebooks, tmp_path, only, message):
    src, ran = fake_notebooks
    with pytest.raises(ValueError, match=message) as err:
        reproduce.run_notebooks("cpu", src, only=only, out_dir=tmp_path / "x")
    assert "00_a" in str(err.value) and "01_b" in str(err.value) and ran == []


@pytest.mark.parametrize("argv, message", [(["--only"], "expected at least one argument"),
                                           (["--only", "no_such_notebook"], "no_such_notebook")])
def test_cli_only_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "no_such_notebook" in argv:
        assert "00_quickstart" in err  # names the valid notebooks


def test_each_run_appends_its_timing_record(fake_notebooks, tmp_path, monkeypatch):
    import json

    import papermill

    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path / "cache"))
    src, ran = fake_notebooks
    out = tmp_path / "executed"
    reproduce.run_notebooks("cpu", src, out_dir=out)
    (tmp_path / "cache" / "routers").mkdir(parents=True)
    (tmp_path / "cache" / "routers" / "r.pt").write_bytes(b"x")
    reproduce.run_notebooks("cpu", src, out_dir=out)  # both finished: skipped
    first, second = json.loads((out / "reproduce.json").read_text())["runs"]
    assert first["cache_files"] == {"routers": 0, "eval": 0} and second["cache_files"] == {"routers": 1, "eval": 0}
    assert [(n["name"], n["status"]) for n in first["notebooks"]] == [("00_a", "ran"), ("01_b", "ran")]
    assert first["total_s"] == pytest.approx(sum(n["wall_s"] for n in first["notebooks"]))
    assert [n["status"] for n in second["notebooks"]] == ["skipped", "skipped"] and second["total_s"] == 0
    assert "git_commit" in first["run"] and first["profile"] == "cpu"

    def fails(nb, out, **kwargs):
        raise RuntimeError("cell failed")

    monkeypatch.setattr(papermill, "execute_notebook", fails)
    with pytest.raises(RuntimeError, match="cell failed"):
        reproduce.run_notebooks("cpu", src, out_dir=out, force=True)
    failed = json.loads((out / "reproduce.json").read_text())["runs"][-1]
    assert [(n["name"], n["status"]) for n in failed["notebooks"]] == [("00_a", "failed")]
