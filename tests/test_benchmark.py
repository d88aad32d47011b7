"""Benchmarks: the cost benchmark's fairness helper (every method finds the same warm page cache) and the GPU
check's CPU code path (benchmarks/gpu_check.py --device cpu --tiny)."""
import builtins
import json

from benchmarks.transfer_cost import warm_page_cache


def test_warm_page_cache_reads_model_dirs_and_files_once(tmp_path, monkeypatch):
    model = tmp_path / "model"
    (model / "shards").mkdir(parents=True)
    for f in [model / "manifest.json", model / "config.json", model / "shards" / "model.safetensors"]:
        f.write_bytes(b"x" * 100)
    cache = tmp_path / "cache" / "teacher.pt"
    cache.parent.mkdir()
    cache.write_bytes(b"y" * 100)
    (cache.parent / "unrelated.pt").write_bytes(b"z")  # beside a plain input: not read
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    warm_page_cache([str(model / "manifest.json"), str(cache), str(cache)])
    assert sorted(opened) == sorted(map(str, [model / "manifest.json", model / "config.json",
                                              model / "shards" / "model.safetensors", cache]))


def test_gpu_check_tiny_runs_every_method_through_the_same_code_path(tmp_path):
    """`gpu_check --device cpu --tiny`: every step finite and present; the FLOPs torch counts (the MFU numerator)
    equal the hand count of the teacher forward: 2 x tokens x linear weights (+ SDPA's two T x T products)."""
    from benchmarks.gpu_check import main

    result = main(["--device", "cpu", "--tiny", "--layers", "2", "--examples", "2", "--tokens", "16",
                   "--out", str(tmp_path / "check.json")])
    steps = {(s["method"], s["phase"]): s for s in result["steps"]}
    for key in [("semalign", "stage 1"), ("kd", "step"), ("seeking", "sensitivity"), ("laten", "step")]:
        assert steps[key]["finite"] and steps[key]["wall_s"] > 0 and steps[key]["tflop"] > 0, key
        assert steps[key]["tokens"] == 2 * 16
    assert all(s["finite"] for s in result["steps"])
    n, T, d, f, heads, layers = 2, 16, 80, 160, 5, 2  # benchmarks.paper_scale.TINY["teacher"]
    linear = 2 * n * T * layers * (4 * d * d + 3 * d * f)
    sdpa = layers * 4 * n * heads * T * T * (d // heads)
    # the CPU's fused SDPA kernel has no formula in torch's counter (CUDA's flash / efficient kernels do)
    assert round(steps[("cache", "teacher fwd")]["tflop"] * 1e12) in (linear, linear + sdpa)
    assert json.loads((tmp_path / "check.json").read_text())["steps"] == result["steps"]


def test_finite_check_and_mfu():
    import torch

    from benchmarks.paper_scale import Step, all_finite, mfu

    assert all_finite({"a": [torch.ones(2), 1.0]}) and not all_finite({"a": [torch.tensor([1.0, float("nan")])]})
    assert not all_finite(float("inf"))
    assert mfu(Step("kd", "step", wall_s=2.0, peak_gb=1, tokens=1, finite=True, tflop=989.0), 989.0) == 0.5
    assert mfu(Step("kd", "step", 2.0, 1, 1, True, None), 989.0) is None
