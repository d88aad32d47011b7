"""The deterministic PKT splits every rule consumes: extract / align / train from the transfer pool, test from the
benchmark, disjoint and written with a manifest of hashes."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from semalign.suite.io import atomic_write_text, sha256, write_jsonl
from semalign.suite.sources import (
    CODE_USER,
    GSM_USER,
    SPLITS,
    TRANSFER_SPLITS,
    _test_set,
    _transfer_pool,
    mmlu_user,
)


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
