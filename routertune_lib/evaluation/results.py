"""Results of an evaluation (:class:`TaskResult`, :class:`EvalResults`) and paired comparisons of two of them
(:func:`compare`: accuracy difference with a paired bootstrap CI; :func:`choice_agreement`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..reporting import write_json
from .tasks import PAPER_TASKS

@dataclass
class TaskResult:
    """One task's results. ``metrics``/``stderr``: ``{"acc": ..., "acc_norm": ...}`` (or ``exact_match``);
    ``metric``: the paper's metric; ``records``: per-example dicts; ``subtasks``: MMLU per-subject ``{acc, n}``."""

    task: str
    metric: str
    num_fewshot: int
    n: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    chance: float
    records: list[dict] = field(repr=False)
    routing: dict = field(default_factory=dict, repr=False)  # raw counts {layer: [executed, total]}
    subtasks: dict = field(default_factory=dict, repr=False)
    seconds: float = 0.0
    cached: bool = False

    @property
    def score(self) -> float:
        return self.metrics[self.metric]


@dataclass
class EvalResults:
    """Results of :func:`evaluate`: ``tasks`` by name, ``config`` (settings), ``routing`` (executed fractions)."""

    tasks: dict[str, TaskResult]
    config: dict
    routing: dict = field(default_factory=dict)

    @property
    def average(self) -> float | None:
        """Unweighted mean of the paper metric over the 8 paper tasks (None unless all 8 were evaluated)."""
        if not all(t in self.tasks for t in PAPER_TASKS):
            return None
        return float(np.mean([self.tasks[t].score for t in PAPER_TASKS]))

    @property
    def partial_average(self) -> float | None:
        """Mean of the paper metric over the paper tasks that were evaluated."""
        got = [self.tasks[t].score for t in PAPER_TASKS if t in self.tasks]
        return float(np.mean(got)) if got else None

    def to_dataframe(self):
        """One row per task: task, metric, value, stderr, chance, n, shots, acc, acc_norm (pandas)."""
        import pandas as pd

        rows = [
            {
                "task": r.task, "metric": r.metric, "value": r.score, "stderr": r.stderr.get(r.metric),
                "chance": r.chance, "n": r.n, "num_fewshot": r.num_fewshot,
                **{k: v for k, v in r.metrics.items()}, "seconds": r.seconds, "cached": r.cached,
            }
            for r in self.tasks.values()
        ]
        return pd.DataFrame(rows)

    def records_dataframe(self):
        import pandas as pd

        return pd.DataFrame([rec for r in self.tasks.values() for rec in r.records])

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "average": self.average,
            "partial_average": self.partial_average,
            "routing": self.routing,
            "tasks": {k: asdict(v) for k, v in self.tasks.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temporary file, then rename)."""
        return write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalResults":
        d = json.loads(Path(path).read_text())
        return cls({k: TaskResult(**v) for k, v in d["tasks"].items()}, d["config"], d.get("routing", {}))


def mean_stderr(x: Sequence[float]) -> tuple[float, float]:
    """Mean and lm-eval's ``mean_stderr`` (sample std, ddof=1, / sqrt(n))."""
    a = np.asarray(x, dtype=float)
    if len(a) < 2:
        return float(a.mean()) if len(a) else float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))



# -- paired bootstrap -------------------------------------------------------------------------------------------


def _mean_over_examples(resampled: np.ndarray) -> np.ndarray:
    return resampled.mean(1)


def bootstrap(x, n_boot: int, rng: np.random.Generator,
              statistic: Callable[[np.ndarray], np.ndarray] = _mean_over_examples) -> np.ndarray:
    """``[n_boot]`` bootstrap replicates of ``statistic`` over resamples (with replacement) of the rows of ``x``
    (``[n, ...]``: one row per example; paired: a row holds both models' values of one example).

    statistic: resampled ``[k, n, ...]`` -> ``[k]``; default the mean over examples. Drawn in blocks of 256
    replicates from ``rng``."""
    x = np.asarray(x, dtype=float)
    boot = np.empty(n_boot)
    for s in range(0, n_boot, 256):
        k = min(256, n_boot - s)
        boot[s : s + k] = statistic(x[rng.integers(0, len(x), size=(k, len(x)))])
    return boot


def closer_verdict(ci_low: float, ci_high: float, higher_better: bool) -> str:
    """Whether a paired difference "a minus b" (95% CI) says ``a`` is closer to the reference than ``b``: ``holds``
    (the CI says so), ``reversed`` (it says the opposite) or ``unresolved``; ``higher_better``: for accuracy-like
    metrics (``False`` for a divergence such as KL)."""
    better, worse = (ci_low > 0, ci_high < 0) if higher_better else (ci_high < 0, ci_low > 0)
    return "holds" if better else "reversed" if worse else "unresolved"


def bootstrap_ci(x, n_boot: int = 2000, seed: int = 0,
                 statistic: Callable[[np.ndarray], np.ndarray] = _mean_over_examples, level: float = 0.95) -> dict:
    """``{"value", "ci_low", "ci_high", "n", "n_boot"}``: ``statistic`` of the examples ``x`` (``[n, ...]``) and its
    percentile bootstrap CI at ``level`` (``n_boot`` replicates, ``seed``)."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0 or n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_ci needs examples, n_boot >= 1 and 0 < level < 1; got {len(x)} examples, "
                         f"n_boot={n_boot}, level={level}")
    boot = bootstrap(x, n_boot, np.random.default_rng(seed), statistic)
    tail = 100 * (1 - level) / 2
    return {"value": float(statistic(x[None])[0]), "ci_low": float(np.percentile(boot, tail)),
            "ci_high": float(np.percentile(boot, 100 - tail)), "n": len(x), "n_boot": n_boot}


# -- paired comparison ------------------------------------------------------------------------------------------


def task_average_ci(per_task: dict[str, Sequence[float]], n_boot: int = 10000, seed: int | np.random.Generator = 0,
                    level: float = 0.95) -> dict:
    """The unweighted mean over tasks of each task's mean of ``per_task`` (``{task: [n_task] per-example values}``,
    e.g. paired differences) with its percentile bootstrap CI at ``level``: each task resampled independently,
    ``n_boot`` replicates drawn from ``seed`` (or a Generator) task by task in order.

    Returns ``{"value", "ci_low", "ci_high", "n", "tasks": {task: {"value", "ci_low", "ci_high", "n"}}}``.
    """
    if not per_task or any(len(x) == 0 for x in per_task.values()):
        raise ValueError(f"task_average_ci needs at least one example per task, got "
                         f"{ {t: len(x) for t, x in per_task.items()} }")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    tail = 100 * (1 - level) / 2
    boots, tasks = [], {}
    for name, x in per_task.items():
        x = np.asarray(x, dtype=float)
        boot = bootstrap(x, n_boot, rng)
        boots.append(boot)
        tasks[name] = {"value": float(x.mean()), "ci_low": float(np.percentile(boot, tail)),
                       "ci_high": float(np.percentile(boot, 100 - tail)), "n": len(x)}
    avg = np.mean(boots, axis=0)
    return {"value": float(np.mean([t["value"] for t in tasks.values()])), "ci_low": float(np.percentile(avg, tail)),
            "ci_high": float(np.percentile(avg, 100 - tail)), "n": sum(t["n"] for t in tasks.values()),
            "tasks": tasks}


def _correct(rec: dict, metric: str) -> float:
    return rec[metric]


def compare(results_a: EvalResults, results_b: EvalResults, n_boot: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of B against A on their common examples.

    Returns ``{"tasks": {task: {metric, a, b, diff, ci_low, ci_high, agreement, n}}, "average": {...}}`` where
    ``diff = b - a`` of the task's paper metric, the 95% CI is a paired bootstrap (examples resampled jointly for
    both models, ``n_boot`` replicates), ``agreement`` = fraction of examples where both chose the same option;
    the average row bootstraps the unweighted mean of the task diffs (each task resampled independently).
    """
    rows, diffs = {}, {}
    for name in results_a.tasks:
        if name not in results_b.tasks:
            continue
        ta, tb = results_a.tasks[name], results_b.tasks[name]
        metric = ta.metric
        rb = {r["doc_id"]: r for r in tb.records}
        pairs = [(r, rb[r["doc_id"]]) for r in ta.records if r["doc_id"] in rb]
        if not pairs:
            continue
        diffs[name] = [_correct(b, metric) - _correct(a, metric) for a, b in pairs]
        agree = [a.get("chosen", a.get("pred")) == b.get("chosen", b.get("pred")) for a, b in pairs]
        rows[name] = {
            "metric": metric, "n": len(pairs),
            "a": float(np.mean([_correct(a, metric) for a, _ in pairs])),
            "b": float(np.mean([_correct(b, metric) for _, b in pairs])),
            "agreement": float(np.mean(agree)),
        }
    avg = {}
    if rows:
        ci = task_average_ci(diffs, n_boot, seed)
        for name, t in ci["tasks"].items():
            rows[name].update(diff=t["value"], ci_low=t["ci_low"], ci_high=t["ci_high"])
        avg = {"diff": ci["value"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "tasks": list(rows)}
    return {"tasks": rows, "average": avg}


def choice_agreement(results_a: EvalResults, results_b: EvalResults) -> dict[str, float]:
    """Per task, the fraction of common examples on which the two models chose the same option."""
    out = {}
    for name, ta in results_a.tasks.items():
        if name in results_b.tasks:
            rb = {r["doc_id"]: r for r in results_b.tasks[name].records}
            same = [r["chosen"] == rb[r["doc_id"]]["chosen"] for r in ta.records if r["doc_id"] in rb and "chosen" in r]
            if same:
                out[name] = float(np.mean(same))
    return out

