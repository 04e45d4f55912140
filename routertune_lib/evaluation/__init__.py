"""Evaluation harness: the paper's eight LM-Evaluation-Harness tasks, a generative exact-match task, perplexity and
fidelity (choice agreement, KL to the dense model), for dense and routed models.

Modules, in the order data flows through them (lm-evaluation-harness's split: tasks are data, the model API and the
evaluator are separate):

* :mod:`.tasks` -- task definitions (:data:`TASK_REGISTRY`), their docs and seeded subsets;
* :mod:`.requests` -- few-shot sampling, request strings and their lm-eval tokenization, calibration prompts;
* :mod:`.scoring` -- the log-likelihood engine (prefix sharing, length chunking) and routing statistics;
* :mod:`.generation` -- greedy generation with stop strings, the exact-match runner;
* :mod:`.results` -- :class:`EvalResults` and the paired accuracy comparison (:func:`compare`);
* :mod:`.evaluator` -- :func:`evaluate` and its results cache;
* :mod:`.reference` -- paired fidelity to a cached reference (log-likelihood change, agreement, KL, perplexity
  ratio, with bootstrap CIs; each model's pass cached per task), KL and perplexity on held-out text.

Every public name is importable from ``routertune_lib.evaluation``.
"""

from .. import data as _data  # noqa: F401  (tests patch ``evaluation._data.load_task``)
from .evaluator import HARNESS_VERSION, evaluate, model_fingerprint, router_hash
from .reference import (
    HELDOUT,
    FidelityResults,
    ReferenceOutputs,
    all_layers_executed,
    fidelity,
    mean_kl,
    perplexity,
    reference_outputs,
    task_average,
)
from .generation import generate_until
from .requests import (FewshotSampler, build_requests, encode_pair, fewshot_sampler, held_out_split, task_prompts,
                       tok_encode)
from .results import (EvalResults, TaskResult, bootstrap_ci, choice_agreement, closer_verdict, compare,
                      task_average_ci)
from .scoring import (
    FORWARD_COST_TOKENS,
    RoutingStats,
    length_chunks,
    loglikelihoods,
    prefix_families,
    prefix_sharing_exact,
)
from .tasks import (
    GEN_TASKS,
    MC_TASKS,
    PAPER_TASKS,
    TASK_REGISTRY,
    GenerativeTask,
    MultipleChoiceTask,
    get_task,
    normalize_answer,
    subset_indices,
    task_docs,
)

__all__ = [
    "FORWARD_COST_TOKENS", "GEN_TASKS", "HARNESS_VERSION", "HELDOUT", "MC_TASKS", "PAPER_TASKS", "TASK_REGISTRY",
    "EvalResults", "FewshotSampler", "FidelityResults", "GenerativeTask", "MultipleChoiceTask", "ReferenceOutputs",
    "RoutingStats", "TaskResult", "all_layers_executed", "bootstrap_ci", "build_requests", "choice_agreement",
    "closer_verdict", "compare", "encode_pair", "evaluate", "fewshot_sampler", "fidelity", "generate_until",
    "get_task", "held_out_split", "length_chunks", "loglikelihoods", "mean_kl", "model_fingerprint",
    "normalize_answer", "perplexity", "prefix_families", "prefix_sharing_exact", "reference_outputs", "router_hash", "subset_indices", "task_average",
    "task_average_ci", "task_docs", "task_prompts", "tok_encode",
]
