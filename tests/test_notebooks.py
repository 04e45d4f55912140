"""Every notebook runs end-to-end with papermill in the ``smoke`` profile (what `make reproduce` runs, in seconds)."""

from pathlib import Path

import pytest

from routertune_lib.reproduce import check_parameters, run_notebooks

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.model  # the smoke profile builds tiny_random_model() from the SmolLM2 GGUF
@pytest.mark.parametrize("notebook", sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.ipynb")))
def test_notebook_runs_in_smoke_profile(notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTERTUNE_RESULTS", str(tmp_path / "results"))
    (executed,) = run_notebooks("smoke", NOTEBOOKS, only=[notebook], out_dir=tmp_path)
    assert executed.exists()


def test_unknown_parameters_and_profiles_fail_with_the_valid_ones():
    notebook = next(NOTEBOOKS.glob("[0-9]*.ipynb"))
    with pytest.raises(ValueError, match="valid parameters"):
        check_parameters(notebook, {"proflie": "cpu"})
    with pytest.raises(ValueError, match="valid profiles"):
        check_parameters(notebook, {"profile": "laptop"})
