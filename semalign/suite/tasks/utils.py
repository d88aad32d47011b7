"""Scoring helpers for the semalign_* lm-eval tasks (loaded by lm-eval from the YAMLs via `!function utils.<fn>`).

Code is executed here, one subprocess per program, instead of through HF `evaluate`'s code_eval: that metric is
fetched from the hub and needs HF_ALLOW_CODE_EVAL, which breaks offline runs.
"""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile

from semalign.suite.sources import gsm8k_solution

EXEC_TIMEOUT_S = 5.0
EXEC_MEMORY_BYTES = 2 * 1024**3  # a runaway allocation fails in the child instead of swapping the host
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


# --------------------------------------------------------------------------------------------------------- GSM8K
def last_number(text: str) -> str | None:
    """Open-Instruct's GSM prediction: the last number in the output, commas removed, trailing '.0's ignored."""
    found = [m.replace(",", "") for m in _NUMBER.findall(text)]
    found = [m for m in found if m.strip("-.")]
    return _canon(found[-1]) if found else None


def _canon(num: str) -> str:
    """'18', '18.0' and '18.00' are the same answer."""
    return num.rstrip("0").rstrip(".") if "." in num else num


def gsm8k_process(doc: dict, results: list[str]) -> dict[str, float]:
    return {"acc": float(last_number(results[0]) == _canon(doc["target"].replace(",", "")))}


def gsm8k_gold(doc: dict) -> str:
    """Continuation after 'Answer:': the reference solution in the PKT answer style."""
    return gsm8k_solution(doc["answer"]).removeprefix("Answer:")


# ---------------------------------------------------------------------------------------------------------- MMLU
def mmlu_gold(doc: dict) -> str:
    return " " + "ABCD"[doc["answer"]]


# ----------------------------------------------------------------------------------------------------------- NLL
def nll(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """-log p(gold continuation | prompt), summed over the continuation's tokens."""
    return {"nll": -float(results[0][0])}


# ---------------------------------------------------------------------------------------------------------- code
def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (EXEC_MEMORY_BYTES, EXEC_MEMORY_BYTES))


def run_program(program: str, timeout: float = EXEC_TIMEOUT_S) -> bool:
    """True iff `program` exits 0 within `timeout` s, run by an isolated interpreter (-I) in a fresh temp cwd."""
    with tempfile.TemporaryDirectory(prefix="semalign_exec_") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", path], cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            start_new_session=True, preexec_fn=_limit_child)
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: programs may fork
            proc.wait()
            return False


def humaneval_program(doc: dict, completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def humaneval_process(doc: dict, results: list[str]) -> dict[str, float]:
    return {"pass@1": float(run_program(humaneval_program(doc, results[0])))}


def extract_code(completion: str) -> str:
    """The code the model wrote after the ```python fence: a repeated opening fence dropped, cut at the closing one."""
    code = re.sub(r"^\s*```(?:python)?[ \t]*\n", "", completion)
    return code.split("```", 1)[0]


def mbpp_program(doc: dict, completion: str) -> str:
    tests = "\n".join(doc["test_list"])
    return f"{doc.get('test_setup_code') or ''}\n{extract_code(completion)}\n\n{tests}\n"


def mbpp_process(doc: dict, results: list[str]) -> dict[str, float]:
    return {"pass@1": float(run_program(mbpp_program(doc, results[0])))}
