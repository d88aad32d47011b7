"""Leaks between the transfer data and the test set, matched on what makes two items the same knowledge, not on
the rendered prompt: a transfer copy of a test question under another subject's header, another template, with its
choices reordered or edited, or with other whitespace and case is still the same question.

Both sides become normalised token runs (casefold, punctuation to spaces, whitespace collapsed). A test item and a
transfer item match when one's question occurs as a contiguous run inside the other's text, in both directions:
test -> transfer (the test question inside the transfer prompt, whatever template surrounds it) and transfer ->
test (the transfer question, its template header stripped, inside the test question). Kinds, strongest first:

- ``prompt``: a code task's whole test prompt (HumanEval signature + docstring, MBPP text + signature);
- ``question+choices``: a multiple-choice question with the same set of choices (order-free);
- ``question``: the question text alone (MBPP's text, HumanEval's docstring, MMLU's stem with other choices).

A match on the text alone needs a specific text: at least ``MIN_TOKENS`` tokens, covering at least ``MIN_COVER`` of
the other side's question. MMLU shares stems across unrelated items ("Which of the following is a true statement?",
"...which of the following is a correct statement?" after a long case): only their choices make them one question.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from semalign.suite.io import atomic_write_text
from semalign.suite.sources import CODE_USER, GSM_USER, MMLU_USER

Tokens = tuple[str, ...]
KINDS = ("prompt", "question+choices", "question")  # strongest first
MIN_TOKENS = 12
MIN_COVER = 0.5
# Lettered options at the end of a prompt (A-D, "A." / "A)" / "(A)"), optionally followed by an "Answer:" cue.
_OPTION_A = re.compile(r"\n[ \t]*\(?A[.):]")
_CHOICES = re.compile(r"\n[ \t]*\(?A[.):]\s*(.*?)\n[ \t]*\(?B[.):]\s*(.*?)\n[ \t]*\(?C[.):]\s*(.*?)"
                      r"\n[ \t]*\(?D[.):]\s*(.*?)\s*(?:\n\s*Answer\s*:?\s*)?", re.S)
_DOCSTRING = re.compile(r'("""|\'\'\')(.*?)\1', re.S)


def normalise(text: str) -> Tokens:
    """Casefold, punctuation to spaces, whitespace collapsed: the words, as compared."""
    return tuple(re.sub(r"[\W_]+", " ", text.casefold()).split())


def _header(template: str, field: str) -> re.Pattern:
    """The template's text before ``{field}``, other placeholders as wildcards, any whitespace flexible."""
    prefix = re.sub(r"(\\\s|\\n|\s)+", r"\\s*", re.escape(template.split("{" + field + "}")[0]))
    return re.compile(r"\s*" + re.sub(r"\\\{\w+\\\}", r"[^\\n]*?", prefix), re.I)


HEADERS = (_header(MMLU_USER, "question"), _header(GSM_USER, "question"), _header(CODE_USER, "prompt"))


@dataclass(frozen=True)
class Item:
    """One record as compared: its id, its fields by kind ("prompt", "question") and its choice set, if any."""
    id: str
    fields: dict[str, Tokens]
    choices: frozenset[Tokens] | None = None


def split_choices(text: str) -> tuple[str, list[str] | None]:
    """(text before the lettered options, the options) of a multiple-choice prompt; (text, None) without options."""
    for m in reversed(list(_OPTION_A.finditer(text))):
        if c := _CHOICES.fullmatch(text, m.start()):
            return text[: m.start()], list(c.groups())
    return text, None


def _choice_set(choices: Iterable[str] | None) -> frozenset[Tokens] | None:
    return None if choices is None else frozenset(normalise(str(c)) for c in choices)


def record_id(rec: dict) -> str:
    return str(rec.get("id", rec.get("task_id")))


def benchmark_item(task: str, rec: dict) -> Item:
    """A benchmark record's comparable fields (see semalign.suite.sources for each task's record)."""
    if task == "mmlu":
        return Item(record_id(rec), {"question": normalise(rec["question"])}, _choice_set(rec["choices"]))
    if task == "gsm8k":
        return Item(record_id(rec), {"question": normalise(rec["question"])})
    if task == "mbpp":
        return Item(record_id(rec), {"prompt": normalise(rec["prompt"]), "question": normalise(rec["text"])})
    if task == "humaneval":
        docs = _DOCSTRING.findall(rec["prompt"])
        fields = {"prompt": normalise(rec["prompt"])}
        return Item(record_id(rec), fields | ({"question": normalise(docs[-1][1])} if docs else {}))
    raise ValueError(f"unknown task {task!r}")


def transfer_item(rec: dict) -> Item:
    """A chat record's user turn: ``prompt`` = its text without the options (template included), ``question`` =
    the same with a known template header stripped; the options, if any, as the choice set."""
    body, choices = split_choices(rec["messages"][0]["content"])
    question = body
    for header in HEADERS:
        if m := header.match(body):
            question = body[m.end():]
            break
    return Item(record_id(rec), {"prompt": normalise(body), "question": normalise(question)}, _choice_set(choices))


def _occurrences(needles: list[Tokens], hays: list[Tokens]) -> set[tuple[int, int]]:
    """(needle index, hay index) for every needle that occurs as a contiguous run in a hay. Needles are indexed by
    their first ``MIN_TOKENS`` tokens, so the scan is one dict lookup per hay position and distinct short length."""
    index: dict[Tokens, list[int]] = defaultdict(list)
    for i, n in enumerate(needles):
        if n:
            index[n[:MIN_TOKENS]].append(i)
    lengths = sorted({len(k) for k in index})
    found = set()
    for j, hay in enumerate(hays):
        for p in range(len(hay)):
            for length in lengths:
                for i in index.get(hay[p:p + length], ()):
                    if hay[p:p + len(needles[i])] == needles[i]:
                        found.add((i, j))
    return found


def _kind(field: str, needle: Tokens, other: Tokens, test: Item, transfer: Item) -> str | None:
    """The kind of a match of ``needle`` inside ``other``'s text, or None when it is too weak to say the items are
    one question (a short or generic stem with other choices)."""
    if field == "question" and test.choices is not None and test.choices == transfer.choices:
        return "question+choices"
    return field if len(needle) >= max(MIN_TOKENS, MIN_COVER * len(other)) else None


def find_matches(task: str, transfer: dict[str, list[dict]], test: list[dict]) -> list[dict]:
    """Every (transfer split, transfer item, test item) sharing knowledge, with the strongest kind per pair:
    ``{"split", "kind", "transfer_id", "test_id"}``, sorted."""
    tests = [benchmark_item(task, r) for r in test]
    best: dict[tuple[str, str, str], str] = {}
    for split, recs in transfer.items():
        items = [transfer_item(r) for r in recs]
        hits = []
        for field in ("prompt", "question"):
            rows = [i for i, t in enumerate(tests) if field in t.fields]
            texts = [tests[i].fields[field] for i in rows]
            for a, b in _occurrences(texts, [x.fields["prompt"] for x in items]):  # test inside transfer
                hits.append((field, texts[a], items[b].fields["question"], rows[a], b))
            for b, a in _occurrences([x.fields["question"] for x in items], texts):  # transfer inside test
                hits.append((field, items[b].fields["question"], texts[a], rows[a], b))
        for field, needle, other, t, x in hits:
            kind = _kind(field, needle, other, tests[t], items[x])
            key = (split, items[x].id, tests[t].id)
            if kind and (key not in best or KINDS.index(kind) < KINDS.index(best[key])):
                best[key] = kind
    return [{"split": s, "kind": k, "transfer_id": x, "test_id": t} for (s, x, t), k in sorted(best.items())]


COUNT_COLUMNS = ["task", "split", "pool", "rows", "matched_transfer", "matched_test", "dropped_from", "dropped"]
MATCH_COLUMNS = ["task", "split", "kind", "transfer_id", "test_id", "dropped"]


def report_tables(manifests: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(counts per task and split, one row per match) from the splits manifests' ``contamination`` reports."""
    counts = [{"task": m["task"], "split": s, **c} for m in manifests for s, c in m["contamination"]["counts"].items()]
    matches = [{"task": m["task"], **x} for m in manifests for x in m["contamination"]["matches"]]
    return pd.DataFrame(counts, columns=COUNT_COLUMNS), pd.DataFrame(matches, columns=MATCH_COLUMNS)


def write_report(manifest_paths: list[str | Path], csv_path: str | Path, counts_path: str | Path,
                 md_path: str | Path) -> None:
    """contamination.csv (the matches), contamination_counts.csv and contamination.md (both)."""
    manifests = [json.loads(Path(p).read_text()) for p in manifest_paths]
    counts, matches = report_tables(manifests)
    atomic_write_text(Path(csv_path), matches.to_csv(index=False))
    atomic_write_text(Path(counts_path), counts.to_csv(index=False))
    keep = any(m["contamination"]["keep"] for m in manifests)
    md = ["### Leaks between transfer data and test set", "",
          "Items of a transfer split that share a question (or a question and its set of choices, or a code prompt) "
          "with a test item; `dropped_from` says where they were removed "
          + ("(nothing is dropped: `data.keep_contaminated` is on)." if keep else
             "(the transfer pool when it still fills the split, else the test set)."), "",
          counts.to_markdown(index=False), "", "### Matches", "",
          matches.to_markdown(index=False) if len(matches) else "None.", ""]
    atomic_write_text(Path(md_path), "\n".join(md))
