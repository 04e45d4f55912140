"""Writing results: tables (CSV + Markdown), JSON records with provenance, figures; always atomically."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import pandas as pd


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # e.g. path is a directory: leave no temporary file behind
        raise
    return path


def _json_default(o):
    """numpy scalars become numbers, tuples lists, paths and anything else their string."""
    if hasattr(o, "item") and getattr(o, "ndim", None) == 0:
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """``obj`` as JSON at ``path``, atomically."""
    return write_atomic(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def write_table(df: pd.DataFrame, out_dir: str | os.PathLike, name: str, floatfmt: str = ".3f") -> tuple[Path, Path]:
    """``<out_dir>/<name>.csv`` and ``<out_dir>/<name>.md``."""
    out_dir = Path(out_dir)
    csv = write_atomic(out_dir / f"{name}.csv", df.to_csv(index=False))
    md = write_atomic(out_dir / f"{name}.md", df.to_markdown(index=False, floatfmt=floatfmt) + "\n")
    return csv, md


# Libraries whose versions decide the numbers a run produces (distribution names, importlib.metadata).
VERSIONED_PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "lm_eval")
# Paths a run writes to: their changes do not make the code that ran differ from the commit.
RUN_OUTPUTS = ("results", "notebooks/executed")


def _git(where: Path, *args: str) -> str | None:
    """Output of ``git <args>`` run in ``where``, or None outside a git checkout / without git."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=where, check=True).stdout.rstrip("\n")
    except (OSError, subprocess.CalledProcessError):
        return None


def git_state(where: str | os.PathLike = Path(__file__).parent) -> dict:
    """``{"git_commit", "git_describe", "git_dirty", "git_changes"}`` of the checkout holding ``where`` (by default
    this package's).

    ``git_changes`` are the ``git status --porcelain`` lines outside :data:`RUN_OUTPUTS` (uncommitted edits and
    untracked files: the code that ran differs from ``git_commit`` exactly when ``git_dirty``). All None outside a
    git checkout.
    """
    commit = _git(where, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_describe": None, "git_dirty": None, "git_changes": None}
    top = _git(where, "rev-parse", "--show-toplevel")
    status = _git(top, "status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in RUN_OUTPUTS))
    changes = status.splitlines() if status else []
    return {"git_commit": commit, "git_describe": _git(where, "describe", "--always", "--tags"),
            "git_dirty": bool(changes), "git_changes": changes}


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``; ``platform.processor()`` elsewhere), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def ram_gib() -> float | None:
    """Total physical memory in GiB, or None where ``os.sysconf`` cannot tell."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)
    except (AttributeError, ValueError, OSError):
        return None


def package_versions(names=VERSIONED_PACKAGES) -> dict[str, str | None]:
    """``{name: installed version}``; None for a package that is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_info() -> dict:
    """Provenance of a run: the code (git commit, uncommitted changes), machine, torch threads, library versions."""
    import torch

    return {
        **git_state(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_gib": ram_gib(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def results_dir(name: str, profile: str) -> Path:
    """``results/<name>/<profile>/`` of this checkout, or under ``$ROUTERTUNE_RESULTS`` when set (tests use it)."""
    base = Path(os.environ.get("ROUTERTUNE_RESULTS", Path(__file__).resolve().parent.parent / "results"))
    path = base / name / profile
    path.mkdir(parents=True, exist_ok=True)
    return path
