"""Writing results: tables (CSV + Markdown), JSON records with provenance, figures; always atomically."""

from __future__ import annotations

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


def run_info() -> dict:
    """Provenance of a run: library versions, machine, git commit of this checkout."""
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def results_dir(name: str, profile: str) -> Path:
    """``results/<name>/<profile>/`` of this checkout, or under ``$ROUTERTUNE_RESULTS`` when set (tests use it)."""
    base = Path(os.environ.get("ROUTERTUNE_RESULTS", Path(__file__).resolve().parent.parent / "results"))
    path = base / name / profile
    path.mkdir(parents=True, exist_ok=True)
    return path
