"""Run every notebook in ``notebooks/`` in order with papermill (``make reproduce``).

Executed copies go to ``notebooks/executed/<profile>/``; a notebook whose executed copy finished is skipped, so an
interrupted run started again continues where it stopped (``--force`` re-runs everything).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

PROFILES = ("smoke", "cpu", "paper")
ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("routertune.reproduce")


def finished(executed: Path) -> bool:
    """True when ``executed`` is a notebook papermill ran to the end without an exception."""
    if not executed.exists():
        return False
    meta = json.loads(executed.read_text()).get("metadata", {}).get("papermill", {})
    return meta.get("exception") is False and meta.get("end_time") is not None


def check_parameters(notebook: Path, parameters: dict) -> None:
    """Raise ``ValueError`` if ``parameters`` names anything the notebook's ``parameters`` cell does not define."""
    import papermill as pm

    valid = set(pm.inspect_notebook(str(notebook)))
    unknown = sorted(set(parameters) - valid)
    if unknown:
        raise ValueError(f"{notebook.name}: unknown parameters {unknown}; valid parameters: {sorted(valid)}")
    if parameters.get("profile", "cpu") not in PROFILES:
        raise ValueError(f"Unknown profile {parameters['profile']!r}; valid profiles: {PROFILES}")


def run_notebooks(
    profile: str,
    notebooks_dir: Path,
    only: list[str] | None = None,
    force: bool = False,
    out_dir: Path | None = None,
) -> list[Path]:
    """Execute ``notebooks_dir/*.ipynb`` in name order with ``profile``; returns the executed copies."""
    import papermill as pm

    out_dir = out_dir or notebooks_dir / "executed" / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for nb in sorted(notebooks_dir.glob("[0-9]*.ipynb")):
        if only and nb.stem not in only:
            continue
        executed = out_dir / nb.name
        if finished(executed) and not force:
            log.info("skip %s (finished earlier: %s)", nb.name, executed)
        else:
            check_parameters(nb, {"profile": profile})
            log.info("run %s (profile=%s)", nb.name, profile)
            start = time.time()
            pm.execute_notebook(str(nb), str(executed), parameters={"profile": profile}, cwd=str(notebooks_dir))
            log.info("done %s in %.0f s", nb.name, time.time() - start)
        done.append(executed)
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "cpu"), choices=PROFILES)
    parser.add_argument("--only", nargs="*", help="notebook names (without .ipynb) to run")
    parser.add_argument("--force", action="store_true", help="re-run notebooks that finished earlier")
    parser.add_argument("--check", action="store_true",
                        help="with --profile paper: run each notebook's paper code path on shrunk models on this "
                             "machine and print the GPU time and memory the real run needs (routertune_lib.paper_check)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.check:
        if args.profile != "paper":
            parser.error(f"--check checks the paper profile; got --profile {args.profile}")
        from .paper_check import run_check

        if not run_check(ROOT / "notebooks", args.only):
            raise SystemExit(1)
        return
    run_notebooks(args.profile, ROOT / "notebooks", args.only, args.force)


if __name__ == "__main__":
    main()
