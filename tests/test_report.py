"""Tables computed from run records: the cost table's ratios and per-example normalisations, the hparam table."""
import pytest

from semalign.report import cost_table, hparam_table

RUNS = {("p", "gsm8k"): {"n_train": 10, "teacher_layers": 4, "student_layers": 2, "cache_forwards": 10}}


def _record(method, seed, wall, uses_cache, **passes):
    return {"pair": "p", "task": "gsm8k", "method": method, "seed": seed, "wall_seconds": wall, "peak_rss_mb": 100.0,
            "peak_gpu_mb": 0.0, "trainable_params": 7, "uses_teacher_cache": uses_cache, "layer_passes": passes}


def test_cost_table_normalises_per_example_and_to_kd():
    records = [
        _record("kd", 0, 10.0, True, student_layer_forward_rows=40, student_layer_backward_rows=40,
                student_layer_forward_tokens=4000),
        _record("kd", 1, 30.0, True, student_layer_forward_rows=40, student_layer_backward_rows=40,
                student_layer_forward_tokens=4000),
        _record("seeking", 0, 10.0, False, teacher_layer_forward_rows=40, student_layer_forward_rows=20,
                student_layer_backward_rows=20, student_layer_forward_tokens=2000),
    ]
    t = cost_table(records, RUNS).set_index("method")
    assert t.loc["kd", "wall (s)"] == 20.0 and t.loc["kd", "wall / kd"] == 1.0  # mean over seeds
    assert t.loc["seeking", "wall / kd"] == 0.5
    assert t.loc["kd", "teacher fwd / example"] == 1.0  # the shared cache: one forward per example
    assert t.loc["seeking", "teacher fwd / example"] == 1.0  # its own: 40 rows / (4 layers x 10 examples)
    assert t.loc["kd", "student layer bwd / example"] == 4.0  # 2 layers x 2 epochs
    assert t.loc["kd", "tokens/s"] == pytest.approx((4000 / 2 / 10 + 4000 / 2 / 30) / 2, abs=1)  # mean of rates
    assert t["trainable params"].dtype.kind == "i"


def test_hparam_table_marks_missing_parameters():
    t = hparam_table({"kd": {"lr": 0.001, "temperature": 1.0}, "laten": {"lr": 3e-4, "steps": 4}}).set_index("parameter")
    assert list(t.columns) == ["kd", "laten"]
    assert t.loc["lr", "kd"] == "0.001" and t.loc["steps", "kd"] == "–" and t.loc["temperature", "laten"] == "–"
