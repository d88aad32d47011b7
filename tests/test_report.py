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


def test_figures_render(tmp_path):
    import numpy as np
    import pandas as pd

    from semalign.report import cka_figure, cost_gain_figure, main_figure

    summary = pd.DataFrame([
        {"pair": "p", "method": m, "task": t, "score": s, "score_ci95": 0.01, "nll": n, "nll_ci95": 0.1}
        for m, s, n in [("none", 0.2, 5.0), ("kd", 0.3, 4.0), ("semalign@loss=v1", 0.25, 4.5)] for t in ["gsm8k", "mmlu"]
    ])
    cost = pd.DataFrame([{"pair": "p", "task": "gsm8k", "method": "kd", "wall / kd": 1.0},
                         {"pair": "p", "task": "gsm8k", "method": "semalign@loss=v1", "wall / kd": 0.5}])
    main_figure(summary, ["kd", "semalign@loss=v1"], ["gsm8k"], tmp_path / "abl", labels={"kd": "x"}, title="T")
    cost_gain_figure(cost, summary, tmp_path / "cg")
    rng = np.random.default_rng(0)
    cka = {"teacher_student": rng.random((3, 5)), "student_self": rng.random((3, 3))}
    cka_figure(cka, cka, tmp_path / "cka", after_label="semalign", title="CKA: p / humaneval")
    for stem in ("abl", "cg", "cka"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 5_000 and (tmp_path / f"{stem}.pdf").exists()
