"""Bounded offline pretraining of the mini profile's student.

The mini student shares the teacher's tokenizer but is initialised independently (never carved out of the
teacher: that would make parameter-reuse baselines unfairly easy). A random student is all noise, so every
transfer method would sit at the floor; a few CPU minutes of next-token training on real offline text give it
a language prior to transfer knowledge into. Corpus (all offline, never benchmark TEST data):

- ``stdlib``: the Python standard library's own sources (English docstrings + code), tests excluded;
- ``gsm8k_train``: GSM8K TRAIN question + answer, a fraction wrapped in the chat template so the student sees
  the format it is evaluated in; any item whose question is also a GSM8K test question is dropped;
- ``dir:<path>``: any other local dir of text files (*.py, *.txt, *.md).
"""
from __future__ import annotations

import math
import os
import random
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from semalign.suite.io import load_manifest
from semalign.suite.models import DTYPES, load_model, save_prepared
from semalign.suite.sources import load_gsm8k_train, load_test_set

CHAT_FRACTION = 0.5  # share of GSM8K items rendered with the chat template (rest as plain "Question/Answer")
MAX_DOC_CHARS = 16_000  # cap per file so a few huge stdlib modules cannot dominate the budget
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _text_files(root: Path) -> list[Path]:
    """Sorted (deterministic across machines) text files under root, test/installed-package dirs excluded."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune: never walk into site-packages
        files += [Path(dirpath) / f for f in filenames if f.endswith(TEXT_SUFFIXES)]
    return sorted(files)


def _dir_docs(root: Path, rng: random.Random) -> Iterator[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"corpus dir {root} does not exist; fix the bootstrap `sources` entry")
    files = _text_files(root)
    rng.shuffle(files)
    for p in files:
        text = p.read_text(errors="replace")[:MAX_DOC_CHARS]
        if text.strip():
            yield text


def gsm8k_test_questions() -> set[str]:
    """The questions the student must never see."""
    return {r["question"].strip() for r in load_test_set("gsm8k")}


def _gsm8k_docs(tokenizer: Any, rng: random.Random) -> Iterator[str]:
    banned = gsm8k_test_questions()
    items = [r for r in load_gsm8k_train() if r["question"].strip() not in banned]
    rng.shuffle(items)
    for r in items:
        if getattr(tokenizer, "chat_template", None) and rng.random() < CHAT_FRACTION:
            messages = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            yield tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            yield f"Question: {r['question']}\nAnswer: {r['answer']}"


def _docs(source: str, tokenizer: Any, rng: random.Random) -> Iterator[str]:
    if source == "stdlib":
        return _dir_docs(Path(sysconfig.get_paths()["stdlib"]), rng)
    if source == "gsm8k_train":
        return _gsm8k_docs(tokenizer, rng)
    if source.startswith("dir:"):
        return _dir_docs(Path(source[4:]).expanduser(), rng)
    raise ValueError(f"unknown bootstrap corpus source {source!r}; use 'stdlib', 'gsm8k_train' or 'dir:<path>'")


def build_corpus(sources: list[str], tokenizer: Any, seq_len: int, max_tokens: int, seed: int) -> torch.Tensor:
    """[n_seq, seq_len] token blocks, each source getting an equal share of ``max_tokens``.

    Documents are eos-separated and packed (no padding: every token trains); blocks are shuffled with the seed
    so batches mix sources. Deterministic for (sources, tokenizer, seq_len, max_tokens, seed).
    """
    if not sources:
        raise ValueError("bootstrap corpus: empty `sources` list")
    eos = tokenizer.eos_token_id
    budget = max_tokens // len(sources)
    stream: list[int] = []
    for i, source in enumerate(sources):
        rng = random.Random(seed * 1_000_003 + i)
        ids: list[int] = []
        for doc in _docs(source, tokenizer, rng):
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
            if len(ids) >= budget:
                break
        stream += ids[:budget]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"bootstrap corpus from {sources} has {len(stream)} tokens, fewer than seq_len={seq_len}")
    blocks = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return blocks[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of the peak lr."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _set_threads(device: str) -> None:
    """Use every core we are allowed, unless the caller (e.g. Snakemake's `threads`) pinned OMP_NUM_THREADS."""
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(len(os.sched_getaffinity(0)))


@torch.no_grad()
def _eval_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: str) -> float:
    was_training = model.training
    model.eval()
    losses = [
        model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in blocks.split(batch_size)
    ]
    model.train(was_training)
    return sum(losses) / len(losses)


def bootstrap_student(
    student_dir: Path,
    out_dir: Path,
    *,
    sources: list[str],
    steps: int,
    seq_len: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_minutes: float | None = None,
    device: str | None = None,
) -> dict:
    """Pretrain the prepared random student for ``steps`` AdamW steps (warmup + cosine) and save it to
    ``out_dir`` as a prepared dir whose manifest gains a ``bootstrap`` record; returns that manifest.

    Each training token is seen once (corpus = steps x batch x seq_len tokens, plus a small held-out set whose
    loss before/after is recorded). ``max_minutes`` bounds wall time: training stops early and says so.
    """
    torch.manual_seed(seed)
    model, tok = load_model(student_dir, device=device, dtype="float32", trainable=True)
    device = str(next(model.parameters()).device)
    _set_threads(device.split(":")[0])
    n_eval = max(1, min(8, steps * batch_size // 20))
    corpus = build_corpus(sources, tok, seq_len, (steps * batch_size + n_eval) * seq_len, seed)
    if len(corpus) < 2:
        raise ValueError(f"bootstrap corpus has {len(corpus)} blocks; need at least 2 (raise steps or add sources)")
    n_eval = min(n_eval, len(corpus) // 2)
    held_out, train = corpus[:n_eval], corpus[n_eval:]

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    eval_before = _eval_loss(model, held_out, batch_size, device)

    log_every = max(1, steps // 50)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    cursor, window, curve = 0, [], []
    steps_done, tokens_seen, stopped_early = 0, 0, False
    start = time.monotonic()
    bar = tqdm(range(steps), desc="bootstrap student", unit="step")
    for step in bar:
        if cursor + batch_size > len(order):  # corpus shorter than planned (small sources): next epoch
            order, cursor = torch.randperm(len(train), generator=gen), 0
        batch = train[order[cursor : cursor + batch_size]].to(device)
        cursor += batch_size
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"bootstrap: non-finite loss {loss.item()} at step {step}; lower lr ({lr})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps_done, tokens_seen = step + 1, tokens_seen + batch.numel()
        window.append(loss.item())
        if steps_done % log_every == 0 or steps_done == steps:
            curve.append({"step": steps_done, "loss": round(sum(window) / len(window), 4)})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
            window = []
        if max_minutes is not None and steps_done < steps and time.monotonic() - start > max_minutes * 60:
            stopped_early = True  # checked after a step, so at least one step always runs
            break
    bar.close()
    minutes = (time.monotonic() - start) / 60
    if window:
        curve.append({"step": steps_done, "loss": round(sum(window) / len(window), 4)})

    manifest = dict(load_manifest(student_dir))
    manifest["bootstrap"] = {
        "steps": steps,
        "steps_done": steps_done,
        "stopped_early": stopped_early,
        "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_seen / max(minutes * 60, 1e-9), 1),
        "final_loss": curve[-1]["loss"],
        "eval_loss_before": round(eval_before, 4),
        "eval_loss_after": round(_eval_loss(model, held_out, batch_size, device), 4),
        "loss_curve": curve,
        "minutes": round(minutes, 3),
        "sources": list(sources),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "device": device,
    }
    model.eval()
    model.to(DTYPES[manifest["dtype"]])  # trained in fp32 (AdamW updates), stored in the prepared model's dtype
    save_prepared(model, tok, manifest, Path(out_dir))
    return manifest
