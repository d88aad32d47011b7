"""The paper's reported numbers (v1 Tables 1-2, verbatim in paper_reported.yaml), matched to our pairs by what was
run (the models' hub ids), never by position, and labelled so a proxy setting is never read as the run's own."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from semalign.suite.labels import TASK_LABELS

PAPER_REPORTED = Path(__file__).with_name("paper_reported.yaml")


def load_paper_reported(path: str | Path = PAPER_REPORTED) -> pd.DataFrame:
    """The paper's numbers as a long table (table, caption, version, teacher/student source and label, setting,
    method, task, score), so a number is found by what was run (the models' sources), never by its position in a table.
    A table's student row is repeated under each of its teachers: it belongs to every pair."""
    doc = yaml.safe_load(Path(path).read_text())
    rows = [
        {"table": int(number), "caption": table["caption"], "version": doc["version"], "teacher": teacher,
         "teacher_label": block["label"], "student": doc["student"]["source"], "student_label": doc["student"]["label"],
         "setting": block["setting"], "method": method, "task": task, "score": float(score)}
        for number, table in doc["tables"].items()
        for teacher, block in table["teachers"].items()
        for method, scores in {"none": table["student"], **block}.items() if isinstance(scores, dict)
        for task, score in scores.items()
    ]
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Reported:
    """The paper's numbers matched to our pairs (per pair: score indexed by (method, task)) and the header words
    naming their setting, so a proxy setting can never be read as the run's own."""

    by_pair: dict[str, pd.Series]
    header: str
    proxy: bool = False  # True: some pair is not a paper setting and every pair got Table 1's numbers

    def column(self, task: str) -> str:
        return f"{TASK_LABELS.get(task, task)} {self.header}"

    def cell(self, pair: str, method: str, task: str) -> str:
        """The reported score, "–" where the paper has none (methods it did not run, tasks it did not report)."""
        score = self.by_pair.get(pair, pd.Series(dtype=float)).get((method, task))
        return "–" if score is None else f"{score:.2f}"


def match_reported(paper: pd.DataFrame, sources: dict[str, tuple[str, str]]) -> Reported:
    """Each pair gets the numbers of the paper's setting with its teacher and student (hub ids, case-insensitive).
    When some pair is not a paper setting (small-scale profiles), every pair gets Table 1's (the paper's main
    setting) and the header names that setting: the numbers are a reference point, not the same experiment."""
    teacher, student = paper.teacher.str.lower(), paper.student.str.lower()
    own = {pair: paper[(teacher == t.lower()) & (student == s.lower())] for pair, (t, s) in sources.items()}
    header, proxy = "paper reported", any(rows.empty for rows in own.values())
    if proxy:
        main = paper[paper.table == 1]
        header = f"paper ({main.setting.iloc[0]}, {main.version.iloc[0]} Tab. 1)"
        own = dict.fromkeys(sources, main)
    # Table 2 repeats Table 1's Llama-2 rows with the same values (tests check): the first is kept
    return Reported({pair: rows.drop_duplicates(["method", "task"]).set_index(["method", "task"])["score"]
                     for pair, rows in own.items()}, header, proxy)

