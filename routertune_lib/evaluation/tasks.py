"""Tasks as data: the paper's eight LM-Evaluation-Harness tasks, ARC-Easy and generative exact-match tasks.

Design (the idea of lm-evaluation-harness 0.4.x): a task is DATA -- prompt functions (``doc_to_text``,
``doc_to_choice``, ``doc_to_target``), few-shot settings and a metric -- and the scoring engine is separate and
branches only on the task's output type (``multiple_choice`` or ``generate_until``), never on its name.
Prompts, choices and targets reproduce lm-eval 0.4.13's task YAMLs; MMLU is lm-eval's ``mmlu`` group (the
size-weighted mean of the subjects = accuracy over all questions, micro).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .. import data as _data

log = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "rte", "openbookqa", "piqa", "mmlu", "winogrande", "hellaswag", "arc_challenge")




def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_process(doc: dict) -> dict:
    """lm-eval's ``hellaswag/utils.py::process_docs`` for one row (adds query, choices, gold)."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        **doc,
        "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_preprocess(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def _winogrande_choices(doc: dict) -> list[str]:
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]


@dataclass(frozen=True)
class MultipleChoiceTask:
    """A log-likelihood multiple-choice task (lm-eval ``output_type: multiple_choice``).

    doc_to_text: doc -> prompt; for ``multiple_input`` tasks doc -> gold index (the choices are contexts).
    doc_to_choice: doc -> choice strings (continuations; contexts for ``multiple_input``).
    doc_to_target: doc -> gold index; for ``multiple_input`` doc -> the shared continuation string.
    description: doc -> text before the few-shot examples (MMLU's subject line), or None.
    fewshot_sampler: ``"default"`` (seeded random) or ``"first_n"``; ``fewshot_group``: doc -> key restricting the
        few-shot pool to docs with the same key (MMLU: subject).
    fewshot_excludes_doc: lm-eval draws ``n + 1`` examples and drops the evaluated doc. lm-eval 0.4.13 does this
        when a config's ``fewshot_split`` equals its ``test_split``, which includes both being unset: BoolQ,
        HellaSwag, PIQA, RTE and WinoGrande. It changes which examples every later doc gets.
    metric: the paper's metric (``acc`` or ``acc_norm``); num_fewshot: the paper's shots.
    """

    name: str
    doc_to_text: Callable[[dict], str | int]
    doc_to_choice: Callable[[dict], list[str]]
    doc_to_target: Callable[[dict], int | str]
    metric: str
    num_fewshot: int
    process_doc: Callable[[dict], dict] | None = None
    description: Callable[[dict], str] | None = None
    multiple_input: bool = False
    fewshot_sampler: str = "default"
    fewshot_group: Callable[[dict], str] | None = None
    fewshot_excludes_doc: bool = False
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    output_type: str = "multiple_choice"

    def gold(self, doc: dict) -> int:
        return int(self.doc_to_text(doc) if self.multiple_input else self.doc_to_target(doc))

    def question(self, doc: dict) -> str:
        """The doc's own question turn (no description, no answer)."""
        if self.multiple_input:
            raise TypeError("multiple_input tasks have one context per choice; use requests()")
        return self.doc_to_text(doc)

    def answer(self, doc: dict) -> str:
        """The gold answer text, as a few-shot example shows it."""
        if self.multiple_input:
            return self.doc_to_target(doc)
        return self.doc_to_choice(doc)[self.doc_to_target(doc)]

    def example_text(self, doc: dict) -> str:
        """A labelled few-shot example: ``q + target_delimiter + a + fewshot_delimiter``."""
        q = self.doc_to_choice(doc)[self.doc_to_text(doc)] if self.multiple_input else self.doc_to_text(doc)
        return q + self.target_delimiter + self.answer(doc) + self.fewshot_delimiter

    def requests(self, doc: dict, fewshot: Sequence[dict] = ()) -> list[tuple[str, str]]:
        """``[(context, continuation)]`` per choice, the strings lm-eval builds."""
        prefix = (self.description(doc) if self.description else "") + "".join(self.example_text(d) for d in fewshot)
        choices = self.doc_to_choice(doc)
        if self.multiple_input:
            cont = self.target_delimiter + self.doc_to_target(doc)
            return [(prefix + c, cont) for c in choices]
        ctx = prefix + self.doc_to_text(doc)
        return [(ctx, self.target_delimiter + c) for c in choices]


@dataclass(frozen=True)
class GenerativeTask:
    """A greedy-generation exact-match task (lm-eval ``output_type: generate_until``).

    load: split name (``"eval"``/``"fewshot"``) -> list of docs; extract: generated text -> answer string;
    doc_to_answer: doc -> gold answer string (both compared after :func:`normalize_answer`).
    fewshot_sampler, fewshot_group: as for :class:`MultipleChoiceTask` (no generative task groups its pool today).
    """

    name: str
    load: Callable[[str], list[dict]]
    doc_to_text: Callable[[dict], str]
    doc_to_target: Callable[[dict], str]
    doc_to_answer: Callable[[dict], str]
    extract: Callable[[str], str]
    until: tuple[str, ...]
    num_fewshot: int
    max_new_tokens: int = 256
    metric: str = "exact_match"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    output_type: str = "generate_until"
    fewshot_from_eval: bool = False  # few-shot pool is the evaluated split (the evaluated doc is excluded)
    fewshot_sampler: str = "default"
    fewshot_group: Callable[[dict], str] | None = None
    version: str = "2"  # in the results-cache key; 2: records carry the routing statistics of the generation

    def prompt(self, doc: dict, fewshot: Sequence[dict] = ()) -> str:
        """The generation prompt: ``sum(text_i + " " + target_i + "\\n\\n") + text`` (lm-eval few-shot format)."""
        return "".join(self.doc_to_text(e) + self.target_delimiter + self.doc_to_target(e) + self.fewshot_delimiter
                       for e in fewshot) + self.doc_to_text(doc)


def _arc(name: str) -> MultipleChoiceTask:
    return MultipleChoiceTask(
        name,
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        doc_to_choice=lambda d: list(d["choices"]["text"]),
        doc_to_target=lambda d: d["choices"]["label"].index(d["answerKey"]),
        metric="acc_norm",
        num_fewshot=25 if name == "arc_challenge" else 0,
    )


def _mmlu_text(d: dict) -> str:
    c = d["choices"]
    return f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


MC_TASKS: dict[str, MultipleChoiceTask] = {
    t.name: t
    for t in [
        _arc("arc_challenge"),
        # ARC-Easy is not a paper task (not in the average); evaluated 0-shot acc_norm like ARC-Challenge's metric.
        _arc("arc_easy"),
        MultipleChoiceTask(
            "boolq",
            doc_to_text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
            doc_to_choice=lambda d: ["no", "yes"],
            doc_to_target=lambda d: int(d["label"]),
            metric="acc",
            num_fewshot=0,
            fewshot_excludes_doc=True,
        ),
        MultipleChoiceTask(
            "hellaswag",
            doc_to_text=lambda d: d["query"],
            doc_to_choice=lambda d: d["choices"],
            doc_to_target=lambda d: d["gold"],
            metric="acc_norm",
            num_fewshot=10,
            fewshot_excludes_doc=True,
            process_doc=_hellaswag_process,
        ),
        MultipleChoiceTask(
            "mmlu",
            doc_to_text=_mmlu_text,
            doc_to_choice=lambda d: ["A", "B", "C", "D"],
            doc_to_target=lambda d: int(d["answer"]),
            metric="acc",
            num_fewshot=5,
            description=lambda d: "The following are multiple choice questions (with answers) about "
            f"{d['subject'].replace('_', ' ')}.\n\n",
            fewshot_sampler="first_n",
            fewshot_group=lambda d: d["subject"],
        ),
        MultipleChoiceTask(
            "openbookqa",
            doc_to_text=lambda d: d["question_stem"],
            doc_to_choice=lambda d: list(d["choices"]["text"]),
            doc_to_target=lambda d: d["choices"]["label"].index(d["answerKey"].lstrip()),
            metric="acc_norm",
            num_fewshot=0,
        ),
        MultipleChoiceTask(
            "piqa",
            doc_to_text=lambda d: f"Question: {d['goal']}\nAnswer:",
            doc_to_choice=lambda d: [d["sol1"], d["sol2"]],
            doc_to_target=lambda d: int(d["label"]),
            metric="acc_norm",
            num_fewshot=0,
            fewshot_excludes_doc=True,
        ),
        MultipleChoiceTask(
            "rte",
            doc_to_text=lambda d: f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
            doc_to_choice=lambda d: ["True", "False"],
            doc_to_target=lambda d: int(d["label"]),
            metric="acc",
            num_fewshot=0,
            fewshot_excludes_doc=True,
        ),
        MultipleChoiceTask(
            "winogrande",
            doc_to_text=lambda d: {"1": 0, "2": 1}[d["answer"]],
            doc_to_choice=_winogrande_choices,
            doc_to_target=lambda d: d["sentence"][d["sentence"].index("_") + 1 :].strip(),
            metric="acc",
            num_fewshot=5,
            fewshot_excludes_doc=True,
            multiple_input=True,
        ),
    ]
}


# -- generative tasks --------------------------------------------------------------------------------------------

def _arithmetic_docs(split: str) -> list[dict]:
    """``allenai/basic_arithmetic`` validation (3000 rows, from the data wheel), with the answer's text."""
    rows = _data.load_wheel_dataset("basic_arithmetic").to_list()
    for r in rows:
        r["answer"] = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
    return rows


def _arithmetic_plus_docs(split: str) -> list[dict]:
    """The additions of ``allenai/basic_arithmetic`` with operands of at most two digits (ids ``*_max1d_plus`` /
    ``*_max2d_plus``; 462 of the 3000 rows): the sub-type a 135M model solves often enough to measure a drop (the
    whole set is mostly 3- to 6-digit arithmetic, subtraction with negative results, multiplication and division)."""
    return [d for d in _arithmetic_docs(split) if re.search(r"_max[12]d_plus$", d["id"])]


def _gsm8k_docs(split: str) -> list[dict]:
    import datasets

    name = {"eval": "test", "fewshot": "train"}[split]
    try:
        return datasets.load_dataset("openai/gsm8k", "main", split=name).to_list()
    except Exception as e:
        raise RuntimeError(
            f"gsm8k needs the Hugging Face hub ({type(e).__name__}: {e}); offline, use the stand-in task "
            "'arithmetic' (allenai/basic_arithmetic from the data wheel)"
        ) from e


def _last_number(text: str) -> str:
    """lm-eval gsm8k 'flexible-extract': the last number-like match."""
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    if not found:
        return text
    a, b = found[-1]
    return a or b


GEN_TASKS: dict[str, GenerativeTask] = {
    t.name: t
    for t in [
        GenerativeTask(
            "gsm8k",
            load=_gsm8k_docs,
            doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
            doc_to_target=lambda d: d["answer"],
            doc_to_answer=lambda d: d["answer"].split("#### ")[-1],
            extract=_last_number,
            until=("Question:", "</s>", "<|im_end|>"),
            num_fewshot=5,
        ),
        # Offline stand-in for the paper's GSM8K figure: exact match of greedy answers to "Calculate a + b =".
        GenerativeTask(
            "arithmetic",
            load=_arithmetic_docs,
            doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
            doc_to_target=lambda d: d["answer"],
            doc_to_answer=lambda d: d["answer"],
            extract=_last_number,
            until=("\n", "Question:", "</s>", "<|im_end|>"),
            num_fewshot=5,
            max_new_tokens=16,
            fewshot_from_eval=True,
        ),
    ]
}
# Additions of at most two-digit numbers (same prompts, scoring): the stand-in where a small model scores clearly above 0.
GEN_TASKS["arithmetic_plus"] = replace(GEN_TASKS["arithmetic"], name="arithmetic_plus", load=_arithmetic_plus_docs)

TASK_REGISTRY: dict[str, MultipleChoiceTask | GenerativeTask] = {**MC_TASKS, **GEN_TASKS}


def get_task(name: str) -> MultipleChoiceTask | GenerativeTask:
    if name not in TASK_REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_REGISTRY)}")
    return TASK_REGISTRY[name]


def normalize_answer(s: str) -> str:
    """lm-eval gsm8k exact_match normalisation: drop ',', '$', a trailing '.', everything up to '#### ', case."""
    s = re.sub(r"(?s).*#### ", "", s.strip())
    s = s.replace(",", "").replace("$", "")
    s = re.sub(r"\.$", "", s)
    return s.strip().lower()




# -- evaluated docs ----------------------------------------------------------------------------------------------


def subset_indices(n: int, limit: int | None, seed: int, task: str = "") -> list[int]:
    """Sorted, seeded subset of ``range(n)`` of size ``limit`` (all of it when ``limit`` is None or >= n).

    Depends only on (task, n, limit, seed), so every model and run sees the same docs.
    """
    if limit is None or limit >= n:
        if limit is not None:
            log.info("%s: limit %d >= split size %d; using the whole split", task, limit, n)
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return sorted(random.Random(f"{task}:{seed}").sample(range(n), limit))


def task_docs(name: str, limit: int | None = None, seed: int = 1234) -> tuple[list[int], list[dict]]:
    """(indices into the eval split, processed docs) of the evaluated subset."""
    task = get_task(name)
    if isinstance(task, GenerativeTask):
        rows = task.load("eval")
        idx = subset_indices(len(rows), limit, seed, name)
        return idx, [rows[i] for i in idx]
    ds = _data.load_task(name, "eval")
    idx = subset_indices(len(ds), limit, seed, name)
    docs = ds.select(idx).to_list() if len(idx) < len(ds) else ds.to_list()
    if task.process_doc:
        docs = [task.process_doc(d) for d in docs]
    return idx, docs

