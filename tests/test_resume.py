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
    ("semalign", "stage_1.pt", {"epochs": 60, "batch_size": 2, "micro_batch_size": 2, "trainable": "full",
                                "loss": "v1", "kl_every_stage": True}),
    ("kd", "last.pt", {"epochs": 60, "batch_size": 2, "micro_batch_size": 2, "trainable": "full"}),
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
