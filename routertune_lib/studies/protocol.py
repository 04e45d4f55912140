"""The protocol the studies share: per-profile settings, the MindSkip router of the paper, calibrate-then-evaluate of
a tuned router, and a :class:`Study` that writes its tables and ``run.json`` under ``results/<study>/<profile>/``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..evaluation import (EvalResults, FidelityResults, ReferenceOutputs, closer_verdict, evaluate, fidelity,
                          get_task, reference_outputs, task_average, task_prompts)
from ..experiments import (measure_speedups, profile_settings, routed_copy, router_record, skipped_share,
                           tuned_routers)
from ..reporting import results_dir, run_info, write_json, write_table
from ..routing import RouterConfig
from ..speed import text_prompt_pool
from ..training import calibrate_thresholds

CAPACITY = 0.5  # the paper's target capacity of the routed layers
CALIB_MAX_LENGTH = 2048  # calibration prompts are scored whole, as the evaluation scores them
# per fidelity metric: the column of FidelityResults.choice_frame, its scale in the tables, whether higher is better
METRICS = {"accuracy": ("accuracy", 100.0, True), "kl": ("kl", 1.0, False)}
TIMING_SHOTS = 10  # timing prompts are few-shot task prompts: at least 10 shots, one per 8 prompt tokens


def settings_for(settings: dict, profile: str) -> dict:
    """A copy of ``settings[profile]`` (a study's evaluation/timing sizes); unknown profiles raise ``ValueError``."""
    if profile not in settings:
        raise ValueError(f"Unknown profile {profile!r}; valid profiles: {sorted(settings)}")
    return dict(settings[profile])


def shots_label(S: dict) -> str:
    """``"paper shots"`` or ``"<k>-shot"`` for a settings dict with ``shots``."""
    return "paper shots" if S["shots"] is None else f"{S['shots']}-shot"


def resolved(ci_low: float, ci_high: float) -> bool:
    """True when a 95% CI excludes 0 (the difference is resolved)."""
    return ci_low > 0 or ci_high < 0


def mindskip_config(num_hidden_layers: int, num_layers: int | None = None, capacity: float = CAPACITY,
                    target: str = "attn", level: str = "sequence") -> RouterConfig:
    """The paper's MindSkip routers: ``target``/``level`` routers on ``num_layers`` (default half) of the deepest layers
    but the last, target ``capacity``, capacity weight 0.1 (the configuration every study's cached routers share)."""
    n = num_hidden_layers // 2 if num_layers is None else num_layers
    return RouterConfig(target=target, level=level, num_layers=n, capacity=capacity, capacity_weight=0.1)


def timing_pool(tokenizer, tasks, speed: dict):
    """``[num_prompts, prompt_len]`` token ids for timing generation (``speed``: a study's speed settings): one
    few-shot prompt of ``tasks`` (``max(TIMING_SHOTS, prompt_len // 8)`` shots) per timing prompt (seed 1, so not
    the calibration prompts); real task text, since random token ids do not route like text."""
    # MMLU's few-shot pool is per subject (5 dev examples), too small for TIMING_SHOTS: time on the other tasks
    pooled = [t for t in tasks if get_task(t).fewshot_group is None] or list(tasks)
    shots = max(TIMING_SHOTS, speed["prompt_len"] // 8)  # the shortest examples (WinoGrande) take 10-20 tokens
    texts = task_prompts(pooled, speed["num_prompts"], seed=1, num_fewshot=shots)
    return text_prompt_pool(tokenizer, texts, speed["num_prompts"], speed["prompt_len"])


def evaluate_setting(model, tokenizer, S: dict) -> EvalResults:
    """``evaluate`` on a study's ``tasks`` with its ``shots`` and ``limit``."""
    return evaluate(model, tokenizer, S["tasks"], num_fewshot=S["shots"], limit=S["limit"])


def reference_for(model, tokenizer, S: dict) -> ReferenceOutputs:
    """The dense ``model``'s outputs (cached) on a study's ``tasks`` with its ``shots`` and ``limit``: what
    :func:`evaluation.fidelity` scores every other setting against, paired per document."""
    return reference_outputs(model, tokenizer, S["tasks"], num_fewshot=S["shots"], limit=S["limit"])


def task_means(fid) -> pd.DataFrame:
    """Per task (rows, in task order), the mean over docs of each column of ``fid.choice_frame()``."""
    return fid.choice_frame().groupby(level="task", sort=False).mean()


def score_row(fid, n_boot: int, num_hidden_layers: int) -> dict:
    """A setting's fidelity pass as table cells: average accuracy over the tasks (%; ``avg``), its paired difference
    to the dense model with a 95% CI (points; ``diff``, ``ci_low``, ``ci_high``), the mean KL(dense || model) per
    document with its CI (``kl``...), choice agreement with dense (%), and the executed / skipped shares of the pass."""
    docs, means = fid.choice_frame(), task_means(fid).mean()
    acc = task_average(docs.assign(d=docs.accuracy - docs.ref_accuracy), "d", n_boot)
    kl = task_average(docs, "kl", n_boot)
    return {"avg": 100 * means.accuracy, "diff": 100 * acc["value"], "ci_low": 100 * acc["ci_low"],
            "ci_high": 100 * acc["ci_high"], "kl": kl["value"], "kl_ci_low": kl["ci_low"], "kl_ci_high": kl["ci_high"],
            "agreement": 100 * means.agreement, "executed": fid.routing.get("overall", 1.0),
            "skipped share": skipped_share(fid.routing, num_hidden_layers)}


def dense_row(fid) -> dict:
    """:func:`score_row`'s cells for the dense reference itself, read from any pass ``fid`` against it (its
    ``ref_accuracy``): the reference's average accuracy, no difference, no KL, full agreement, nothing skipped."""
    return {"avg": 100 * task_means(fid).ref_accuracy.mean(), "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "kl": 0.0,
            "kl_ci_low": 0.0, "kl_ci_high": 0.0, "agreement": 100.0, "executed": 1.0, "skipped share": 0.0}


def ci_rows(frame: pd.DataFrame, col: str, n_boot: int, metric: str, higher_better: bool,
            scale: float = 1.0) -> list[dict]:
    """Per task and averaged over tasks (:func:`evaluation.task_average` of ``frame[col]``, per-document paired
    differences ``a - b``): ``scale`` times the mean with its 95% CI and a verdict on "``a`` is closer to dense than
    ``b``" (``holds``: the CI says so, ``reversed``: the CI says the opposite, ``unresolved``); ``scale > 0``."""
    ci = task_average(frame, col, n_boot)
    rows = []
    for task, c in [*ci["tasks"].items(), ("average", ci)]:
        lo, hi = scale * c["ci_low"], scale * c["ci_high"]
        rows.append({"task": task, "metric": metric, "n": c["n"], "diff": scale * c["value"], "ci_low": lo,
                     "ci_high": hi, "verdict": closer_verdict(lo, hi, higher_better)})
    return rows


def paired_rows(a, b, n_boot: int) -> list[dict]:
    """``a`` minus ``b`` (two fidelity passes on the same documents) per metric of :data:`METRICS`: the rows of
    :func:`ci_rows`, per task and averaged over tasks."""
    d = a.choice_frame() - b.choice_frame()
    if d.isna().any().any():
        raise ValueError("paired_rows: the two passes scored different documents")
    return [r for metric, (col, scale, higher_better) in METRICS.items()
            for r in ci_rows(d, col, n_boot, metric, higher_better, scale)]


def calibrate(model, prompts, capacity: float, per_layer: bool, tokenizer):
    """Thresholds of a routed ``model`` calibrated to ``capacity`` on unlabelled ``prompts`` (scored whole)."""
    return calibrate_thresholds(model, prompts, capacity=capacity, per_layer=per_layer, tokenizer=tokenizer,
                                max_length=CALIB_MAX_LENGTH)


@dataclass
class RoutedRun:
    """One tuned router checkpoint, calibrated and evaluated (and timed when a timing pool was given)."""

    path: Path
    record: dict  # experiments.router_record: key, steps, wall_time_s, final_capacity, ...
    thresholds: object
    results: EvalResults | FidelityResults  # FidelityResults when tuned_run was given a reference
    speed: pd.Series | None  # the routed row of measure_speedups (speedup, kv_ratio, skipped_share, ...)


def tuned_run(model_name, model, tokenizer, router_config: RouterConfig, train_config, S: dict, calibration, *,
              num_samples: int, data_source: str = "offline-mix", capacity: float = CAPACITY, timing_pool=None,
              name: str = "routed", reference: ReferenceOutputs | None = None) -> RoutedRun:
    """Tune (or load from the cache) ``router_config`` routers on ``model``, calibrate a copy to ``capacity`` on
    ``calibration`` (per layer when ``S["calib_per_layer"]``), evaluate it on ``S`` (with a ``reference``: one
    :func:`evaluation.fidelity` pass against it instead, ``S["n_boot"]`` replicates) and, with ``timing_pool``
    (``[P, T]`` token ids), time it against ``model`` with ``S["speed"]``."""
    path = tuned_routers(model_name, router_config, train_config, data_source=data_source, num_samples=num_samples,
                         model=model, tokenizer=tokenizer)
    speed = None
    with routed_copy(model, path) as routed:
        thresholds = calibrate(routed, calibration, capacity, S["calib_per_layer"], tokenizer)
        results = (evaluate_setting(routed, tokenizer, S) if reference is None
                   else fidelity(routed, tokenizer, reference, n_boot=S["n_boot"]))
        if timing_pool is not None:
            speed = measure_speedups(model, {name: routed}, timing_pool, **S["speed"]).iloc[1]
    return RoutedRun(path, router_record(path), thresholds, results, speed)


@dataclass
class Study:
    """A running study: its settings, the tables it wrote and the values its figures and verdicts read.

    ``tables`` holds every table written (``<out_dir>/<name>.csv`` and ``.md``); ``info`` the scalars and labels
    figures and verdicts need (layer counts, model label, ...)."""

    name: str
    profile: str
    settings: dict  # the study's SETTINGS[profile]
    profile_settings: dict | None  # experiments.PROFILES[profile] (model, tuning budget), None where not used
    out_dir: Path
    started: float = field(default_factory=time.time)
    provenance: dict = field(default_factory=run_info)  # taken at the start: the code the run imported
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, profile: str, settings: dict, shared_profile: bool = True) -> Study:
        """A study ``name`` (its results go to ``results_dir(name, profile)``) with ``settings[profile]``."""
        S = settings_for(settings, profile)
        P = profile_settings(profile) if shared_profile else None
        return cls(name, profile, S, P, results_dir(name, profile))

    @property
    def model_label(self) -> str:
        """The profile's model name, or ``"tiny random"`` (smoke)."""
        return (self.profile_settings or self.settings).get("model") or "tiny random"

    def scored_tasks(self, table: str) -> list[str]:
        """The study's tasks that have a column in ``tables[table]`` (those every compared model was scored on)."""
        return [t for t in self.settings["tasks"] if t in self.tables[table].columns]

    def table(self, name: str, df: pd.DataFrame, floatfmt: str = ".3f") -> pd.DataFrame:
        """Write ``df`` as ``<out_dir>/<name>.csv`` / ``.md``, keep it in ``tables`` and return it."""
        write_table(df, self.out_dir, name, floatfmt=floatfmt)
        self.tables[name] = df
        return df

    def finish(self, **record) -> None:
        """Write ``run.json``: profile, settings, ``record``, wall time since the start and the provenance taken at
        the start (``reporting.run_info``)."""
        head = {"profile": self.profile}
        if self.profile_settings is not None:
            head["profile_settings"] = self.profile_settings
        wall = time.time() - self.started
        write_json(self.out_dir / "run.json", {**head, "settings": self.settings, **record, "wall_time_s": wall,
                                               "run": self.provenance})
        print(f"wall time {wall:.0f} s; results in {self.out_dir}")
