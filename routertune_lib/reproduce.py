"""Run every notebook in ``notebooks/`` in order with papermill (``make reproduce``).

Executed copies go to ``notebooks/executed/<profile>/``; a notebook whose executed copy finished is skipped, so an
interrupted run started again continues where it stopped (``--force`` re-runs everything). Each invocation appends
its record to ``notebooks/executed/<profile>/reproduce.json`` (rewritten after every notebook): the code and machine
(``reporting.run_info``), how full the cache was at the start (``cache_files``), and per notebook whether it ran or
was skipped and its wall time; ``total_s`` sums the notebooks run. A run from an empty cache is one whose
``cache_files`` are all 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

PROFILES = ("smoke", "cpu", "paper")
CACHED = ("routers", "eval")  # cache subdirectories whose contents let a run skip work (tuned routers, references)
ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("routertune.reproduce")


def finished(executed: Path) -> bool:
    """True when ``executed`` is a notebook papermill ran to the end without an exception.

    Papermill (2.x) sets the notebook's ``papermill.end_time`` when it stops for any reason, its ``exception`` to True
    on a failed cell (it stays None on success), and each cell's ``papermill.status`` to ``completed`` once run; an
    interrupted run leaves the interrupted cell ``running`` and a failed one leaves later cells ``pending``. So
    finished means: an end time, no exception, every cell completed and no error output. A file that is not a
    readable notebook (e.g. truncated by a killed run) is unfinished, with a warning.
    """
    if not executed.exists():
        return False
    try:
        nb = json.loads(executed.read_text())
        if not isinstance(nb, dict):
            raise ValueError(f"a JSON {type(nb).__name__}, not a notebook object")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        log.warning("%s is not a readable notebook (%s); it counts as unfinished and will be re-run", executed, e)
        return False
    meta = nb.get("metadata", {}).get("papermill", {})
    cells = nb.get("cells", [])
    return (
        meta.get("end_time") is not None
        and meta.get("exception") is not True
        and bool(cells)
        and all(c.get("metadata", {}).get("papermill", {}).get("status") == "completed" for c in cells)
        and not any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
    )


def cache_files() -> dict[str, int]:
    """Files under each of ``CACHED`` in routertune's cache (``data.cache_dir``): 0 everywhere is an empty cache."""
    from .data import cache_dir

    return {name: sum(1 for f in (cache_dir() / name).rglob("*") if f.is_file()) for name in CACHED}


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
    """Execute ``notebooks_dir/[0-9]*.ipynb`` (those named in ``only``, when given) in name order with ``profile``;
    returns the executed copies. Raises ``ValueError`` when ``only`` is empty or names a notebook that does not
    exist."""
    import papermill as pm

    notebooks = sorted(notebooks_dir.glob("[0-9]*.ipynb"))
    if only is not None:
        valid = [nb.stem for nb in notebooks]
        unknown = [name for name in only if name not in valid]
        if not only:
            raise ValueError(f"--only needs at least one notebook name; valid names: {valid}")
        if unknown:
            raise ValueError(f"--only: no notebook named {unknown} in {notebooks_dir}; valid names: {valid}")
        notebooks = [nb for nb in notebooks if nb.stem in only]
    out_dir = out_dir or notebooks_dir / "executed" / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    from .reporting import run_info, write_json

    records = out_dir / "reproduce.json"
    earlier = json.loads(records.read_text())["runs"] if records.is_file() else []
    this = {"profile": profile, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "force": force,
            "cache_files": cache_files(), "run": run_info(), "notebooks": [], "total_s": 0.0}
    done = []
    for nb in notebooks:
        executed = out_dir / nb.name
        if finished(executed) and not force:
            log.info("skip %s (finished earlier: %s)", nb.name, executed)
            this["notebooks"].append({"name": nb.stem, "status": "skipped", "wall_s": None})
        else:
            check_parameters(nb, {"profile": profile})
            log.info("run %s (profile=%s)", nb.name, profile)
            start = time.time()
            entry = {"name": nb.stem, "status": "running", "wall_s": None}
            this["notebooks"].append(entry)
            write_json(records, {"runs": earlier + [this]})
            try:
                pm.execute_notebook(str(nb), str(executed), parameters={"profile": profile}, cwd=str(notebooks_dir))
            except BaseException:
                entry.update(status="failed", wall_s=round(time.time() - start, 1))
                write_json(records, {"runs": earlier + [this]})
                raise
            entry.update(status="ran", wall_s=round(time.time() - start, 1))
            this["total_s"] = round(this["total_s"] + entry["wall_s"], 1)
            log.info("done %s in %.0f s (this run so far: %.0f s)", nb.name, entry["wall_s"], this["total_s"])
        write_json(records, {"runs": earlier + [this]})
        done.append(executed)
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "cpu"), choices=PROFILES)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="notebook names (without .ipynb) to run")
    parser.add_argument("--force", action="store_true", help="re-run notebooks that finished earlier")
    parser.add_argument("--check", action="store_true",
                        help="with --profile paper: run each notebook's paper code path on shrunk models on this "
                             "machine and print the GPU time and memory the real run needs (routertune_lib.paper_check)")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="with --check: notebooks checked at once (default: one per CPU core)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.check:
        if args.profile != "paper":
            parser.error(f"--check checks the paper profile; got --profile {args.profile}")
        from .paper_check import run_check

        if not run_check(ROOT / "notebooks", args.only, jobs=args.jobs):
            raise SystemExit(1)
        return
    try:
        run_notebooks(args.profile, ROOT / "notebooks", args.only, args.force)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
