"""Bootstrap of the mini student: the corpus is offline and test-free, training really lowers the loss, the
result is a prepared dir, and a seed fixes everything."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from semalign.suite.bootstrap import bootstrap_student, build_corpus, gsm8k_test_questions, lr_factor
from semalign.suite.io import load_manifest
from semalign.suite.models import load_model, load_tokenizer
from semalign.suite.sources import data_dir

# First GSM8K test question: must never reach the student.
TEST_Q = "Janet\u2019s ducks lay 16 eggs per day."
TRAIN_Q = "Natalia sold clips to 48 of her friends in April"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer({"source": str(tokenizer_dir)})


def test_real_gsm8k_corpus_has_train_not_test(tok):
    if data_dir() is None:
        pytest.skip("no local GSM8K data (SEMALIGN_DATA_DIR / ../shared/data)")
    assert any(q.startswith(TEST_Q) for q in gsm8k_test_questions())
    blocks = build_corpus(["gsm8k_train"], tok, seq_len=256, max_tokens=2_000_000, seed=0)  # all of train
    text = tok.decode(blocks.flatten())
    assert TRAIN_Q in text
    assert TEST_Q not in text
    assert "<|im_start|>assistant" in text and "Question: " in text  # chat template on a fraction only


def test_contaminated_train_item_is_dropped(tmp_path, monkeypatch, tok):
    """Even if a test question leaked into the train file, the corpus builder drops it."""
    (tmp_path / "gsm8k").mkdir()
    leaked = {"question": "LEAKED: how many ducks does Janet have?", "answer": "#### 16"}
    clean = {"question": "CLEAN: what is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
    (tmp_path / "gsm8k" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in [leaked, clean] * 20))
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps(leaked))
    monkeypatch.setenv("SEMALIGN_DATA_DIR", str(tmp_path))
    text = tok.decode(build_corpus(["gsm8k_train"], tok, seq_len=16, max_tokens=10_000, seed=0).flatten())
    assert "CLEAN" in text and "LEAKED" not in text


def test_missing_data_dir_is_clear(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("SEMALIGN_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="SEMALIGN_DATA_DIR"):
        build_corpus(["gsm8k_train"], tok, seq_len=16, max_tokens=1000, seed=0)
    with pytest.raises(ValueError, match="unknown bootstrap corpus source"):
        build_corpus(["wikipedia"], tok, seq_len=16, max_tokens=1000, seed=0)


def test_stdlib_corpus_shape_and_determinism(tok):
    a = build_corpus(["stdlib"], tok, seq_len=64, max_tokens=20_000, seed=1)
    b = build_corpus(["stdlib"], tok, seq_len=64, max_tokens=20_000, seed=1)
    c = build_corpus(["stdlib"], tok, seq_len=64, max_tokens=20_000, seed=2)
    assert a.shape == (312, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    text = tok.decode(a.flatten())
    assert "def " in text and "import" in text


def _run(student: Path, out: Path, seed: int = 0, **kw) -> dict:
    # GSM8K's train questions join the corpus where local data exists (a clone without ../shared/data has none:
    # the training behaviour under test does not depend on them; the GSM8K corpus has its own tests above)
    sources = ["stdlib"] + (["gsm8k_train"] if data_dir() is not None else [])
    args = dict(sources=sources, steps=24, seq_len=32, batch_size=4, lr=3e-3, seed=seed, device="cpu")
    return bootstrap_student(student, out, **{**args, **kw})


@pytest.fixture(scope="module")
def boot(tiny_pair, tmp_path_factory) -> tuple[Path, Path, dict]:
    student = tiny_pair[1]
    out = tmp_path_factory.mktemp("boot") / "student"
    return student, out, _run(student, out)


def test_bootstrap_lowers_loss_and_saves(boot):
    student, out, manifest = boot
    b = manifest["bootstrap"]
    assert b["steps_done"] == 24 and b["tokens_seen"] == 24 * 4 * 32 and not b["stopped_early"]
    assert b["loss_curve"][0]["loss"] > 10.0  # ~ln(49152) = 10.8 at random init
    assert b["eval_loss_after"] < b["eval_loss_before"] - 0.5
    assert b["final_loss"] < b["loss_curve"][0]["loss"] - 0.5
    assert load_manifest(out) == manifest
    ref = load_manifest(student)
    assert {k: v for k, v in manifest.items() if k != "bootstrap"} == ref  # same model shape + tokenizer

    model, tok = load_model(out, device="cpu")
    assert model.config.num_hidden_layers == 2 and len(tok) == 49152
    before, after = load_file(student / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("proj.weight"))


def test_bootstrap_deterministic(boot, tmp_path):
    student, out, manifest = boot
    again = _run(student, tmp_path / "again")
    assert again["bootstrap"]["loss_curve"] == manifest["bootstrap"]["loss_curve"]
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_minutes_stops_early(boot, tmp_path):
    student, _, _ = boot
    b = _run(student, tmp_path / "short", max_minutes=0)["bootstrap"]
    assert b["stopped_early"] and b["steps_done"] == 1 and b["steps"] == 24
    assert (tmp_path / "short" / "manifest.json").is_file()


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(s, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and factors[-1] == pytest.approx(0.1, abs=1e-3)
