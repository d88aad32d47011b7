"""The deterministic PKT splits every rule consumes: extract / align / train from the transfer pool, test from the
benchmark, disjoint, decontaminated (semalign.suite.contamination) and written with a manifest of hashes."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from semalign.suite.contamination import find_matches, record_id
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
    """A test item rendered as the transfer data's user turn, the format its evaluation prompt shares."""
    if task == "gsm8k":
        return GSM_USER.format(question=rec["question"])
    if task == "mmlu":
        return mmlu_user(rec)
    return CODE_USER.format(prompt=rec["prompt"])


def _keys(recs: list[dict]) -> set[str]:
    return {_norm(r["messages"][0]["content"]) for r in recs}


def check_disjoint(task: str, splits: dict[str, list[dict]], keep_contaminated: bool = False) -> None:
    """ValueError if two transfer splits share a question or, unless contaminated items are kept on purpose, any
    transfer item shares knowledge with a test item (semalign.suite.contamination)."""
    keys = {s: _keys(splits[s]) for s in TRANSFER_SPLITS}
    for i, a in enumerate(TRANSFER_SPLITS):
        for b in TRANSFER_SPLITS[i + 1:]:
            if n := len(keys[a] & keys[b]):
                raise ValueError(f"{task}: {a} and {b} splits share {n} question(s)")
    if not keep_contaminated and (bad := find_matches(task, {s: splits[s] for s in TRANSFER_SPLITS}, splits["test"])):
        raise ValueError(f"{task}: test split overlaps the transfer data in {len(bad)} item(s), e.g. {bad[0]}")


def decontaminate(task: str, pool: dict[str, list[dict]], test: list[dict], sizes: dict[str, int],
                  keep: bool = False) -> tuple[dict[str, list[dict]], list[dict], dict]:
    """Drop the items that transfer splits share with the test set (every split checked, whatever its source):
    from a transfer split's pool when what stays still fills its size, else from the test set; ``keep`` drops
    nothing (the matches are still reported). Returns the pools, the test set and the report: ``matches`` (each
    with ``dropped``: transfer / test / kept) and ``counts`` per split."""
    matches = find_matches(task, pool, test)
    pool, drop_test, counts = dict(pool), set(), {}
    for s in TRANSFER_SPLITS:
        mine = [m for m in matches if m["split"] == s]
        bad, leaked = {m["transfer_id"] for m in mine}, {m["test_id"] for m in mine}
        action = ("" if not mine else "kept" if keep
                  else "transfer" if len(pool[s]) - len(bad) >= sizes[s] else "test")
        for m in mine:
            m["dropped"] = action
        counts[s] = {"pool": len(pool[s]), "matched_transfer": len(bad), "matched_test": len(leaked),
                     "dropped_from": action, "dropped": {"transfer": len(bad), "test": len(leaked)}.get(action, 0)}
        if action == "transfer":
            pool[s] = [r for r in pool[s] if record_id(r) not in bad]
        elif action == "test":
            drop_test |= leaked
    counts["test"] = {"pool": len(test), "matched_transfer": len({(m["split"], m["transfer_id"]) for m in matches}),
                      "matched_test": len({m["test_id"] for m in matches}), "dropped_from": "test" if drop_test else "",
                      "dropped": len(drop_test)}
    test = [r for r in test if record_id(r) not in drop_test]
    return pool, test, {"keep": keep, "matches": matches, "counts": counts}


def _subsample(task: str, split: str, pool: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None:
        return list(pool)
    if n <= 0:
        raise ValueError(f"{task}: {split} size must be positive, got {n}")
    if n > len(pool):
        raise ValueError(f"{task}: {split} size {n} exceeds the {len(pool)} available items")
    return random.Random(f"{seed}:{task}:{split}").sample(pool, n)  # str seeds are stable across processes


def make_splits(task: str, sizes: dict[str, int], test_size: int | None, seed: int, out_dir: Path,
                keep_contaminated: bool = False) -> dict:
    """Write out_dir/{extract,align,train,test}.jsonl + manifest.json; deterministic per seed, checked disjoint and
    decontaminated (the manifest's ``contamination`` lists what was matched and dropped).

    Everything is validated before the first write, so a failing call leaves no partial output (a crash between two
    file writes can still leave a subset; the manifest is written last, so its presence marks a complete set).
    """
    missing = [s for s in TRANSFER_SPLITS if s not in sizes]
    if missing:
        raise ValueError(f"{task}: no size given for split(s) {missing}")
    pool, sources = _transfer_pool(task)
    test, test_src = _test_set(task)
    # Benchmarks share items across their splits (MMLU: the PKT mmlu pool holds test questions under another
    # subject's header; MBPP: task 248 = a train task): matched before subsampling, so dropping keeps the sizes.
    pool, test, report = decontaminate(task, pool, test, sizes, keep_contaminated)
    splits = {s: _subsample(task, s, pool[s], sizes[s], seed) for s in TRANSFER_SPLITS}
    splits["test"] = _subsample(task, "test", test, test_size, seed)
    check_disjoint(task, splits, keep_contaminated)  # the guard: extract/align/train disjoint and the test split clean

    out_dir = Path(out_dir)
    files = {}
    for s in SPLITS:
        path = out_dir / f"{s}.jsonl"
        write_jsonl(path, splits[s])
        files[s] = {"path": path.name, "rows": len(splits[s]), "sha256": sha256(path),
                    "source": test_src if s == "test" else sources[s]}
        report["counts"][s]["rows"] = len(splits[s])
    manifest = {"task": task, "seed": seed, "sizes": {s: sizes[s] for s in TRANSFER_SPLITS}, "test_size": test_size,
                "contamination": report, "files": files}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
