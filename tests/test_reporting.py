"""Provenance in run.json (``reporting.run_info``): the code that ran, the machine, the library versions."""

import importlib.metadata
import subprocess

import torch

from routertune_lib import reporting


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_state_names_commit_and_uncommitted_code(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    clean = reporting.git_state(tmp_path)
    assert clean["git_commit"] == head and clean["git_dirty"] is False and clean["git_changes"] == []

    (tmp_path / "results" / "00").mkdir(parents=True)  # what a run writes does not make the code dirty
    (tmp_path / "results" / "00" / "run.json").write_text("{}")
    assert reporting.git_state(tmp_path)["git_dirty"] is False

    (tmp_path / "code.py").write_text("x = 2\n")
    (tmp_path / "new.py").write_text("")
    dirty = reporting.git_state(tmp_path)
    assert dirty["git_commit"] == head and dirty["git_dirty"] is True
    assert sorted(dirty["git_changes"]) == [" M code.py", "?? new.py"]


def test_git_state_outside_a_checkout(tmp_path):
    assert set(reporting.git_state(tmp_path).values()) == {None}


def test_run_info_identifies_machine_threads_and_versions():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        info = reporting.run_info()
    finally:
        torch.set_num_threads(threads)
    assert info["torch_threads"] == 1
    assert info["git_commit"] is not None and isinstance(info["git_dirty"], bool)  # the tests run in a checkout
    assert info["cpu_model"] and info["ram_gib"] > 0
    assert set(info["versions"]) == set(reporting.VERSIONED_PACKAGES)
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["lm_eval"] == importlib.metadata.version("lm_eval")


def test_package_versions_missing_package_is_none():
    assert reporting.package_versions(["no-such-package-routertune"]) == {"no-such-package-routertune": None}
