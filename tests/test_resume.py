"""A transfer killed with SIGKILL in the middle of its work and re-run ends bit-identical to an uninterrupted run
(CPU), and the kill leaves no partial output behind: checkpoints and models are written atomically."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from semalign.frontier import teacher_layers_for
from semalign.pairing import pair_layers
from semalign.suite.cache import build_teacher_cache
from semalign.suite.io import write_jsonl
from semalign.suite.models import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (method, checkpoint file that marks "a unit of work is done", params long enough to be killed in the next unit)
CASES = [
    ("semalign", "stage_1.pt", {"epochs": 30, "batch_size": 2, "micro_batch_size": 2, "trainable": "full",
                                "loss": "v1", "kl_every_stage": True}),
    ("kd", "last.pt", {"epochs": 30, "batch_size": 2, "micro_batch_size": 2, "trainable": "full"}),
]


@pytest.fixture
def inputs(tiny_pair, chat_records, tmp_path):
    teacher, student = tiny_pair
    splits = tmp_path / "splits"
    write_jsonl(splits / "train.jsonl", chat_records)
    (splits / "manifest.json").write_text("{}")
    pairing = pair_layers(4, 2, "depth_ratio")
    (tmp_path / "pairing.json").write_text(json.dumps(pairing))
    build_teacher_cache(teacher, chat_records, layers=teacher_layers_for(pairing, "block"), max_len=48, batch_size=6,
                        out_path=tmp_path / "teacher.pt")
    return {"teacher": str(teacher / "manifest.json"), "student": str(student / "manifest.json"),
            "splits": str(splits / "manifest.json"), "cache": str(tmp_path / "teacher.pt"),
            "pairing": str(tmp_path / "pairing.json")}


def _spawn(method, params, inputs, out_dir):
    spec = {"method": method, "task": "gsm8k", "inputs": inputs, "out_dir": str(out_dir), "params": params,
            "seed": 0, "device": "cpu", "max_len": 48, "train_on_inputs": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.transfer_cost", "--child", str(out_dir / "spec.json")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _weights(model_dir):
    return load_model(model_dir)[0].state_dict()


@pytest.mark.parametrize("method, marker, params", CASES, ids=[c[0] for c in CASES])
def test_sigkill_then_rerun_equals_uninterrupted(inputs, tmp_path, method, marker, params):
    straight = _spawn(method, params, inputs, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]

    killed_dir = tmp_path / "killed"
    proc = _spawn(method, params, inputs, killed_dir)
    deadline = time.time() + 300
    while not list(killed_dir.glob(f"ckpt/*/{marker}")):
        assert proc.poll() is None, "the run ended before its first checkpoint: " + proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # well into the next stage / epoch
    assert proc.poll() is None, "the run finished before it could be killed: raise epochs"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # nothing half-written under a real name: no model, no record (a temporary being written at the kill may stay)
    assert not (killed_dir / "model").exists() and not (killed_dir / "transfer.json").exists()
    (killed_dir / "ckpt" / ".last.pt.4242.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves it

    rerun = _spawn(method, params, inputs, killed_dir)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()[-3000:]
    # regression: a kill during a checkpoint save left `.last.pt.<pid>.tmp` behind for good; the re-run removes it
    assert not [p for p in killed_dir.rglob("*") if ".tmp" in p.name]
    a, b = _weights(tmp_path / "straight" / "model"), _weights(killed_dir / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    curve = lambda d: (d / "loss_curve.csv").read_text()  # noqa: E731
    assert curve(tmp_path / "straight") == curve(killed_dir)


# ----------------------------------------------------------------------------------- stale and corrupt checkpoints
FAST = {"epochs": 2, "batch_size": 3, "micro_batch_size": 3, "trainable": "full", "lr": 1e-2}


def _ctx(tiny_pair, splits, out_dir, artifacts=None, params=FAST):
    from semalign.suite.registry import TransferContext

    return TransferContext(teacher=tiny_pair[0], student=tiny_pair[1], splits=splits, task="gsm8k", out_dir=out_dir,
                           params=dict(params), seed=0, max_len=48, artifacts=artifacts or {})


def _transfer(method, ctx):
    from semalign.suite.pipeline import run_transfer

    record = run_transfer(method, ctx, ctx.out_dir / "transfer.json")
    return record, _weights(ctx.out_dir / "model")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _splits(root, records):
    write_jsonl(root / "train.jsonl", records)
    return root


def test_changed_data_after_finished_run_trains_fresh_not_stale(tiny_pair, chat_records, tmp_path, capsys):
    """Regression (issue 14): a finished run's checkpoint was keyed by config and seed only, so after the data changed
    the re-run "resumed" the old final checkpoint in no time and saved the model trained on the old data."""
    old, new = _splits(tmp_path / "old", chat_records[:3]), _splits(tmp_path / "new", chat_records[3:])
    out = tmp_path / "run"
    first, w_old = _transfer("lora_sft", _ctx(tiny_pair, old, out))
    assert first["resumed"] is False
    again, w_again = _transfer("lora_sft", _ctx(tiny_pair, old, out))  # same inputs: a true resume, no training
    assert again["resumed"] is True and _same(w_again, w_old)
    capsys.readouterr()

    write_jsonl(old / "train.jsonl", chat_records[3:])  # the data changes in place, as a rebuilt split does
    stale, w_stale = _transfer("lora_sft", _ctx(tiny_pair, old, out))
    log = capsys.readouterr().out
    assert "checkpoint key changed" in log and "inputs.splits/train.jsonl" in log
    fresh, w_fresh = _transfer("lora_sft", _ctx(tiny_pair, new, tmp_path / "fresh"))
    assert stale["resumed"] is False
    assert not _same(w_stale, w_old)
    assert _same(w_stale, w_fresh)


@pytest.fixture
def cache_inputs(tiny_pair, chat_records, tmp_path):
    """A teacher cache and depth-ratio pairing for the cache readers (kd, semalign)."""
    pairing = pair_layers(4, 2, "depth_ratio")
    (tmp_path / "pairing.json").write_text(json.dumps(pairing))
    build_teacher_cache(tiny_pair[0], chat_records[:3], layers=teacher_layers_for(pairing, "block"), max_len=48,
                        batch_size=6, out_path=tmp_path / "teacher.pt")
    return {"cache": tmp_path / "teacher.pt", "pairing": tmp_path / "pairing.json"}


@pytest.mark.parametrize("method, params", [
    ("kd", FAST),
    ("semalign", {**FAST, "loss": "v1", "recompose": "projector"}),
], ids=["kd", "semalign"])
def test_rebuilt_teacher_cache_trains_fresh(tiny_pair, chat_records, cache_inputs, tmp_path, method, params, capsys):
    """The cache readers: a cache rebuilt on other data (data.seed changed) must not resume the old checkpoints."""
    splits = _splits(tmp_path / "splits", chat_records[:3])
    out = tmp_path / "run"
    _, w_old = _transfer(method, _ctx(tiny_pair, splits, out, cache_inputs, params))
    pairing = json.loads(cache_inputs["pairing"].read_text())
    build_teacher_cache(tiny_pair[0], chat_records[3:], layers=teacher_layers_for(pairing, "block"), max_len=48,
                        batch_size=6, out_path=cache_inputs["cache"])
    capsys.readouterr()
    stale, w_stale = _transfer(method, _ctx(tiny_pair, splits, out, cache_inputs, params))
    assert "checkpoint key changed" in capsys.readouterr().out
    _, w_fresh = _transfer(method, _ctx(tiny_pair, splits, tmp_path / "fresh", cache_inputs, params))
    assert stale["resumed"] is False and not _same(w_stale, w_old) and _same(w_stale, w_fresh)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("method, params, unit", [
    ("lora_sft", FAST, "last.pt"),
    ("semalign", {**FAST, "loss": "v1", "recompose": "projector"}, "stage_1.pt"),
], ids=["lora_sft", "semalign"])
def test_truncated_checkpoint_is_moved_aside_and_a_plain_rerun_recovers(tiny_pair, chat_records, cache_inputs,
                                                                         tmp_path, method, params, unit, capsys):
    """Regression (issue 14): a truncated checkpoint failed every re-run with a torch error naming no file."""
    splits = _splits(tmp_path / "splits", chat_records[:3])
    out = tmp_path / "run"
    _, w_first = _transfer(method, _ctx(tiny_pair, splits, out, cache_inputs, params))
    (ckpt,) = out.glob(f"ckpt/*/{unit}")
    _truncate(ckpt)
    capsys.readouterr()
    again, w_again = _transfer(method, _ctx(tiny_pair, splits, out, cache_inputs, params))
    assert f"corrupt checkpoint {ckpt}" in capsys.readouterr().out
    assert len(list(ckpt.parent.glob(f"{unit}.corrupt-*"))) == 1 and ckpt.exists()  # moved aside, rewritten
    assert _same(w_again, w_first)  # retrained to the same weights (CPU runs are deterministic)
    assert str(ckpt) not in again["resumed_from"]


def test_truncated_teacher_cache_names_its_path_and_is_moved_aside_for_the_rebuild(cache_inputs):
    """Regression (issue 14): a truncated cache failed with `OSError: [Errno 22]` and no path. Now the loader names it
    and moves it aside, so the cache_teacher rule's output is missing and the next workflow run rebuilds it."""
    from semalign.suite.cache import TeacherCache
    from semalign.suite.io import CorruptFileError

    path = cache_inputs["cache"]
    _truncate(path)
    with pytest.raises(CorruptFileError, match=f"corrupt teacher cache {path} .*re-run the workflow to rebuild it"):
        TeacherCache.load(path)
    assert not path.exists() and len(list(path.parent.glob("teacher.pt.corrupt-*"))) == 1


def test_semalign_exploding_lr_stops_naming_stage_and_step(tiny_pair, chat_records, cache_inputs, tmp_path):
    """The frontier loop checks divergence too (lr 1e12 on a tiny model), naming method, stage and step."""
    from semalign.suite.train import DivergenceError

    splits = _splits(tmp_path / "splits", chat_records[:3])
    params = {**FAST, "loss": "v1", "recompose": "projector", "lr": 1e12}
    with pytest.raises(DivergenceError, match=r"semalign stage 1 step 0: trainable weight norm"):
        _transfer("semalign", _ctx(tiny_pair, splits, tmp_path / "run", cache_inputs, params))
