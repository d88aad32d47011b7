"""Files written the one safe way: atomically (temporary + rename), so a crash never leaves a half-written
output under its real name, and read with errors that name the file and line."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class ModelNotFoundError(FileNotFoundError):
    """A spec names a model that cannot be found; the message says which spec and what to set."""


def load_manifest(path: Path | str) -> dict:
    """A prepared model dir's manifest (architecture, dtype, tokenizer hash): read here, without torch, so a job
    that only needs a model's shape (the pairing) need not import it."""
    p = Path(path) / "manifest.json"
    if not p.is_file():
        raise ModelNotFoundError(f"{p} not found; {path} is not a prepared model dir (run the prepare_model rule)")
    return json.loads(p.read_text())


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    """Non-empty lines of a jsonl file as dicts; a malformed line, or one lacking a ``required`` field, is an error
    naming the file, the line and the field (not a KeyError deep in whatever reads the record)."""
    required = tuple(required)
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
            if missing := [k for k in required if k not in rec]:
                raise ValueError(f"{path}:{n}: record lacks field(s) {missing} (required: {', '.join(required)})")
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
    """Content hash, streamed: model weights and teacher caches do not fit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """sha256 of ``path``, remembered in a ``.<name>.sha256`` sidecar keyed by (size, mtime_ns, inode): a multi-GB
    cache or model is read once, not once per run that depends on it. Every write here replaces the file (atomic
    rename: new inode and mtime), so a changed file never matches its old sidecar. The sidecar is a best-effort
    memo: in a read-only directory the hash is simply recomputed."""
    path = Path(path)
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo = path.with_name(f".{path.name}.sha256")
    try:
        known = json.loads(memo.read_text())
        if known["stamp"] == stamp:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256(path)
    try:
        atomic_write_text(memo, json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass
    return digest


class CorruptFileError(RuntimeError):
    """A written file that no longer loads; the message names it and where it was moved."""


def first_line(error: BaseException) -> str:
    """An exception's first line, capped: enough to name the cause in a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def move_aside(path: str | Path) -> Path:
    """Rename a corrupt file to ``<name>.corrupt-<UTC time>`` (kept for inspection, out of every reader's way)."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.replace(path, aside)
    return aside


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a file object: given a path, torch names the archive's inner folder after it, here the
    temporary's name with the process id, so the same object saved by two jobs differed in bytes (and in the hash a
    transfer's checkpoint fingerprint takes of every artifact)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
