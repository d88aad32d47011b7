"""The data layer (semalign.suite.sources, splits) on the real ../shared/data files: normalisation, deterministic disjoint splits, clear errors."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from semalign.suite import contamination as c
from semalign.suite import io, sources, splits

needs_data = pytest.mark.skipif(sources.data_dir() is None, reason="no local data dir (../shared/data)")
SIZES = {"extract": 3, "align": 4, "train": 5}


@needs_data
def test_gsm8k_records_normalised():
    first = sources.load_test_set("gsm8k")[0]  # "Janet's ducks": the solution ends with "#### 18"
    assert first["question"].startswith("Janet") and first["target"] == "18"
    assert sources.gsm8k_target("So 1,234 in total\n#### 1,234") == "1234"
    sol = sources.gsm8k_solution(first["answer"])
    assert "<<" not in sol and sol.startswith("Answer: ") and sol.endswith("So the answer is 18.")


@needs_data
def test_mmlu_mbpp_humaneval_records_normalised():
    mmlu = sources.load_test_set("mmlu")
    assert len(mmlu) == 14042
    rec = next(r for r in mmlu if r["subject"] == "anatomy")
    assert rec["answer"] == 0 and len(rec["choices"]) == 4 and rec["question"].startswith("A lesion causing")
    mbpp = sources.load_test_set("mbpp")
    assert [r["task_id"] for r in mbpp] == list(range(11, 511))
    assert mbpp[0]["prompt"].splitlines()[-1].startswith("def ") and isinstance(mbpp[0]["test_list"], list)
    he = sources.load_test_set("humaneval")
    assert len(he) == 164 and set(he[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}


@needs_data
def test_mbpp_prompt_matches_protocol_files():
    """Our MBPP prompt builder reproduces the PKT protocol's user turns byte for byte."""
    by_text = {r["text"].strip(): r for r in io.read_jsonl(sources.data_dir() / "mbpp" / "mbpp.jsonl")}
    for rec in sources.load_transfer_pool("mbpp")["extract"]:
        user = rec["messages"][0]["content"]
        row = by_text[user.split("\n\n\n", 1)[1].split("\n", 1)[0].strip()]
        assert user == sources.CODE_USER.format(prompt=sources._mbpp_record(row)["prompt"])


@needs_data
def test_transfer_pool_is_protocol_files():
    pool = sources.load_transfer_pool("gsm8k")
    assert {k: len(v) for k, v in pool.items()} == {"extract": 20, "align": 80, "train": 1000}
    assert all(r["messages"][0]["role"] == "user" and r["id"] for r in pool["train"])
    assert len({r["id"] for r in sources.load_transfer_pool("mbpp")["train"]}) == 300  # ids added where absent


@needs_data
def test_fallback_pool_from_train_sets(tmp_path, monkeypatch):
    """Without pkt_splits, the pool is cut from the benchmark's train data, disjoint from its test set."""
    for sub in ("gsm8k", "mbpp"):
        (tmp_path / sub).symlink_to(sources.data_dir() / sub)
    monkeypatch.setenv("SEMALIGN_DATA_DIR", str(tmp_path))
    gsm = sources.load_transfer_pool("gsm8k")
    assert sum(map(len, gsm.values())) == 7473 and gsm["train"][0]["messages"][1]["content"].startswith("Answer: ")
    he = sources.load_transfer_pool("humaneval")  # MBPP non-test tasks as code-instruction data
    assert sum(map(len, he.values())) == 974 - 500
    m = splits.make_splits("gsm8k", SIZES, 5, seed=0, out_dir=tmp_path / "out")
    assert m["files"]["train"]["source"].endswith("gsm8k/train.jsonl")


@needs_data
def test_make_splits_deterministic_and_hashed(tmp_path):
    a = splits.make_splits("gsm8k", SIZES, 6, seed=1, out_dir=tmp_path / "a")
    b = splits.make_splits("gsm8k", SIZES, 6, seed=1, out_dir=tmp_path / "b")
    c = splits.make_splits("gsm8k", SIZES, 6, seed=2, out_dir=tmp_path / "c")
    assert a == b and a["files"] != c["files"]
    for split in sources.SPLITS:
        path = tmp_path / "a" / f"{split}.jsonl"
        assert a["files"][split]["sha256"] == io.sha256(path)
        assert a["files"][split]["rows"] == len(io.read_jsonl(path)) == {**SIZES, "test": 6}[split]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == a
    test = io.read_jsonl(tmp_path / "a" / "test.jsonl")
    assert set(test[0]) == {"id", "question", "answer", "target"}
    assert not list(tmp_path.glob("*/.*.tmp"))


@needs_data
def test_make_splits_full_test_set_is_decontaminated(tmp_path):
    """The PKT mmlu pool holds 23 MMLU test questions (each match read by hand), 12 of them only under another
    subject's header (clinical_knowledge <-> college_medicine) or with other choices, which the old rendered-prompt
    check missed; with pools to spare they leave the pool and the full test set stays whole."""
    m = splits.make_splits("mmlu", SIZES, None, seed=0, out_dir=tmp_path)
    matches = m["contamination"]["matches"]
    assert len(matches) == 23 and {x["dropped"] for x in matches} == {"transfer"}
    assert Counter(x["kind"] for x in matches) == {"question+choices": 18, "question": 5}
    assert {"split": "align", "kind": "question+choices", "transfer_id": "clinical_knowledge_30",
            "test_id": "college_medicine_test_56", "dropped": "transfer"} in matches
    assert m["files"]["test"]["rows"] == 14042


@needs_data
@pytest.mark.parametrize("task, n", [("gsm8k", 0), ("humaneval", 0), ("mbpp", 4)])
def test_protocol_pools_vs_real_test_sets(task, n):
    """The real check on the other tasks: GSM8K and HumanEval are clean; MBPP's pool holds test tasks 248 (verbatim),
    216 and 217 (other signature) and 174 (a near-copy)."""
    matches = c.find_matches(task, sources.load_transfer_pool(task), sources.load_test_set(task))
    assert len(matches) == n
    if task == "mbpp":
        assert {x["test_id"] for x in matches} == {"174", "216", "217", "248"}


@needs_data
@pytest.mark.parametrize("sizes, test_size, match", [
    ({"extract": 21, "align": 4, "train": 5}, 3, "gsm8k: extract size 21 exceeds"),
    ({"extract": 0, "align": 4, "train": 5}, 3, "gsm8k: extract size must be positive"),
    ({"extract": 2, "align": 4, "train": 5}, -1, "gsm8k: test size must be positive"),
    ({"extract": 2, "align": 4, "train": 5}, 10**6, "gsm8k: test size"),
    ({"extract": 2, "align": 4}, 3, "no size given"),
])
def test_make_splits_size_errors(tmp_path, sizes, test_size, match):
    with pytest.raises(ValueError, match=match):
        splits.make_splits("gsm8k", sizes, test_size, seed=0, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written on error


@needs_data
def test_overlap_is_rejected():
    pool = sources.load_transfer_pool("gsm8k")
    test = sources.load_test_set("gsm8k")[:5]
    clean = {**{s: pool[s][:5] for s in sources.TRANSFER_SPLITS}, "test": test}
    splits.check_disjoint("gsm8k", clean)
    with pytest.raises(ValueError, match="gsm8k: extract and train splits share 1"):
        splits.check_disjoint("gsm8k", {**clean, "train": clean["train"] + [clean["extract"][0]]})
    leaked = sources._chat("x", splits.test_prompt("gsm8k", {**test[2], "question": test[2]["question"] + "  "}), "A")
    with pytest.raises(ValueError, match="gsm8k: test split overlaps the transfer data in 1 item"):
        splits.check_disjoint("gsm8k", {**clean, "align": clean["align"] + [leaked]})


def test_missing_data_dir_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMALIGN_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="SEMALIGN_DATA_DIR=.*does not exist"):
        sources.load_test_set("gsm8k")


def test_offline_without_local_data_errors(monkeypatch):
    monkeypatch.setattr(sources, "data_dir", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="set SEMALIGN_DATA_DIR .* or enable network"):
        sources.load_test_set("mmlu")


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'math'"):
        sources.load_test_set("math")


@pytest.mark.parametrize("line, culprit", [('{"id": 1', "malformed JSON"), ("[1, 2]", "expected a JSON object")])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, culprit):
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": 0}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"train.jsonl:3: {culprit}"):
        io.read_jsonl(path)


def test_test_record_missing_a_field_names_file_line_and_field(tmp_path, monkeypatch):
    """Regression (issue 14): a GSM8K test record without `answer` gave `KeyError: 'answer'`, no file, no line."""
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q1", "answer": "#### 1"}\n{"question": "q2"}\n')
    monkeypatch.setenv("SEMALIGN_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"gsm8k/test.jsonl:2: record lacks field\(s\) \['answer'\]"):
        sources.load_test_set("gsm8k")


def test_mmlu_row_missing_a_column_names_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "algebra_test.csv").write_text(
        'question,choice0,choice1,choice2,choice3,answer\n"Q, multi\nline",1,2,3,4,0\nQ2,1,2,3,4\n')
    monkeypatch.setenv("SEMALIGN_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"algebra_test.csv:4: row lacks column\(s\) \['answer'\]"):
        sources.load_test_set("mmlu")
