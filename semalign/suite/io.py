"""Files written the one safe way: atomically (temporary + rename), so a crash never leaves a half-written
output under its real name, and read with errors that name the file and line."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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



def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
