"""The transfer/test leak check (semalign.suite.contamination) on hand-built records: the variants a rendered-prompt
check misses are caught, what only looks alike is not, and dropping keeps the split sizes where the pool allows."""
from __future__ import annotations

import json

from semalign.suite import contamination as c
from semalign.suite import io, sources, splits

Q = "When branched chain amino acids are deaminated in muscle, the ammonia produced is mostly:"
CHOICES = ["converted into arginine.", "converted into alanine and glutamine.", "converted into urea.", "used for purines."]
TEST = {"id": "college_medicine_test_56", "subject": "college_medicine", "question": Q, "choices": CHOICES, "answer": 1}
GENERIC = "Which of the following is a true statement?"  # an MMLU stem shared by unrelated items


def chat(rid: str, user: str) -> dict:
    return sources._chat(rid, user, "The answer is: B")


def mmlu_chat(rid: str, **fields) -> dict:
    return chat(rid, sources.mmlu_user({**TEST, **fields}))


def kinds(task: str, transfer: list[dict], test: list[dict]) -> dict[str, str]:
    """transfer id -> kind of its match (all in one split)."""
    return {m["transfer_id"]: m["kind"] for m in c.find_matches(task, {"train": transfer}, test)}


def test_normalise_casefold_punctuation_whitespace():
    assert c.normalise("  The ammonia,\n produced IS (mostly):") == ("the", "ammonia", "produced", "is", "mostly")


def test_mmlu_variants_are_caught():
    variants = [
        mmlu_chat("header", subject="clinical_knowledge"),  # another subject's header
        mmlu_chat("order", choices=CHOICES[::-1]),  # reordered choices
        mmlu_chat("edited", question=Q.upper().replace(" ", "  \n"), choices=[x.title() + " " for x in CHOICES]),
        chat("template", f"Question: {Q}\n(A) {CHOICES[2]}\n(B) {CHOICES[0]}\n(C) {CHOICES[1]}\n(D) {CHOICES[3]}"),
        mmlu_chat("reworded_choices", choices=["arginine", "alanine", "urea", "purines"]),  # same (long) question
    ]
    assert kinds("mmlu", variants, [TEST]) == {"header": "question+choices", "order": "question+choices",
                                                "edited": "question+choices", "template": "question+choices",
                                                "reworded_choices": "question"}


def test_mmlu_lookalikes_are_not_caught():
    other_q = "Which amino acid carries most of the nitrogen released from muscle to the liver in the fasting state?"
    lookalikes = [
        mmlu_chat("same_choices", question=other_q),  # a different question with the same choices
        mmlu_chat("generic_stem", question=GENERIC, choices=["a", "b", "c", "d"]),
        mmlu_chat("stem_inside", question=f"A study of 40 runners found a mean of 3 km. {GENERIC}"),
    ]
    test = [TEST, {**TEST, "id": "generic", "question": GENERIC, "choices": ["w", "x", "y", "z"]}]
    assert kinds("mmlu", lookalikes, test) == {}
    # the same generic stem *with* the same choices is the same item, however short
    assert kinds("mmlu", [mmlu_chat("twin", question=GENERIC, choices=["z", "y", "x", "w"])], test) == {
        "twin": "question+choices"}


def test_both_directions():
    """test -> transfer: the test question inside a longer transfer prompt; transfer -> test: the transfer question
    (its header stripped) inside a longer test question."""
    preamble = "Read carefully. "
    inside_transfer = [chat("t", sources.GSM_USER.format(question="Tom has 3 apples and buys 9 more at the shop "
                                                                  "on Monday. How many apples does he have now?"))]
    test = [{"id": "g1", "question": "tom has 3 apples and buys 9 more at the shop on monday how many apples does he "
                                     "have now"}]
    assert kinds("gsm8k", inside_transfer, test) == {"t": "question"}
    inside_test = [{"id": "g2", "question": preamble + test[0]["question"]}]
    assert kinds("gsm8k", inside_transfer, inside_test) == {"t": "question"}
    assert kinds("gsm8k", inside_transfer, [{"id": "g3", "question": "Tom has 3 apples. How many pears?"}]) == {}


def test_code_prompt_and_question():
    row = {"task_id": 248, "text": "Write a function to calculate the harmonic sum of n-1 for any positive integer n.",
           "code": "def harmonic_sum(n):\n  return 1", "test_list": []}
    test = [sources._mbpp_record(row)]
    same = chat("same", sources.CODE_USER.format(prompt=test[0]["prompt"]))
    renamed = chat("renamed", f"Please solve: {row['text']}\ndef harm(k)")  # other template, other signature
    assert kinds("mbpp", [same, renamed], test) == {"same": "prompt", "renamed": "question"}
    he = {"task_id": "HumanEval/0", "prompt": 'def add(x, y):\n    """Return the sum of the two integers x and y, '
                                               'for example add(2, 3) is 5.\n    """\n'}
    doc = chat("doc", "Write a python function. Return the sum of the two integers x and y, for example add(2, 3) is 5.")
    assert kinds("humaneval", [doc], [he]) == {"doc": "question"}


def question(i: int) -> str:
    return f"Test question number {i}: how many of the eleven red apples in the basket are left after lunch?"


def _pool(split: str, n: int, leaked: int) -> list[dict]:
    """n GSM-style chats, the first ``leaked`` of them copies of test questions."""
    return [chat(f"{split}{i}", sources.GSM_USER.format(question=question(i) if i < leaked else f"{split} {i}?"))
            for i in range(n)]


TESTSET = [{"id": f"t{i}", "question": question(i)} for i in range(6)]


def test_decontaminate_drops_from_transfer_when_the_pool_allows():
    pool = {"extract": _pool("e", 5, 0), "align": _pool("a", 8, 2), "train": _pool("t", 4, 1)}
    sizes = {"extract": 3, "align": 6, "train": 4}  # align: 8 - 2 >= 6; train: 4 - 1 < 4
    kept, test, report = splits.decontaminate("gsm8k", pool, TESTSET, sizes)
    assert [len(kept[s]) for s in ("extract", "align", "train")] == [5, 6, 4]
    assert {r["id"] for r in kept["align"]} == {f"a{i}" for i in range(2, 8)}
    assert [r["id"] for r in test] == ["t1", "t2", "t3", "t4", "t5"]  # t0 leaked into train, which is not spare
    counts = report["counts"]
    assert counts["align"] == {"pool": 8, "matched_transfer": 2, "matched_test": 2, "dropped_from": "transfer",
                               "dropped": 2}
    assert counts["train"]["dropped_from"] == "test" and counts["test"]["dropped"] == 1
    assert {(m["split"], m["transfer_id"], m["test_id"], m["dropped"]) for m in report["matches"]} == {
        ("align", "a0", "t0", "transfer"), ("align", "a1", "t1", "transfer"), ("train", "t0", "t0", "test")}
    _, test_kept, report_kept = splits.decontaminate("gsm8k", pool, TESTSET, sizes, keep=True)
    assert test_kept == TESTSET and {m["dropped"] for m in report_kept["matches"]} == {"kept"}


def test_make_splits_keeps_sizes_and_reports(tmp_path, monkeypatch):
    """End to end on a hand-built data dir: the leaked pool items never reach a split, every split has its size,
    and the report tables list the matches with the ids on both sides."""
    pkt = tmp_path / "pkt_splits" / "gsm"
    pkt.mkdir(parents=True)
    for split, recs in {"extract": _pool("e", 4, 0), "align": _pool("a", 6, 0), "train": _pool("t", 10, 3)}.items():
        io.write_jsonl(pkt / f"gsm_{split}_split.jsonl", recs)
    (tmp_path / "gsm8k").mkdir()
    io.write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": t["question"], "answer": "#### 1"} for t in TESTSET])
    monkeypatch.setenv("SEMALIGN_DATA_DIR", str(tmp_path))
    m = splits.make_splits("gsm8k", {"extract": 2, "align": 3, "train": 7}, None, seed=0, out_dir=tmp_path / "out")
    assert {s: f["rows"] for s, f in m["files"].items()} == {"extract": 2, "align": 3, "train": 7, "test": 6}
    train_ids = {r["id"] for r in io.read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert train_ids == {f"t{i}" for i in range(3, 10)}
    # 8 of 10 cannot spare the 3 leaked: they stay in train and their test twins go
    full = splits.make_splits("gsm8k", {"extract": 2, "align": 3, "train": 8}, None, seed=0, out_dir=tmp_path / "x")
    assert full["files"]["test"]["rows"] == 3 and full["contamination"]["counts"]["test"]["dropped"] == 3
    assert [r["id"] for r in io.read_jsonl(tmp_path / "x" / "test.jsonl")] == [f"gsm8k_test_{i}" for i in (3, 4, 5)]

    c.write_report([tmp_path / "out" / "manifest.json"], tmp_path / "c.csv", tmp_path / "n.csv", tmp_path / "c.md")
    assert (tmp_path / "c.csv").read_text().splitlines() == [
        "task,split,kind,transfer_id,test_id,dropped",
        *(f"gsm8k,train,question,t{i},gsm8k_test_{i},transfer" for i in range(3))]
    counts = (tmp_path / "n.csv").read_text().splitlines()
    assert counts[0] == ",".join(c.COUNT_COLUMNS) and "gsm8k,train,10,7,3,3,transfer,3" in counts
    assert "| gsm8k  | train   |     10 |      7 |" in (tmp_path / "c.md").read_text()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["contamination"]["keep"] is False
