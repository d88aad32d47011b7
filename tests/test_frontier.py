"""Frontier schedule on a tiny real-tokenizer pair: layer calls match HF, only layer k moves at stage k,
a stopped-and-resumed run is bit-identical to an uninterrupted one, curves, every loss variant runs, NaN stops."""
import csv
import json

import pytest
import torch

from semalign.bases import aligned_map
from semalign.frontier import (
    SemAlignConfig,
    StageLimitReached,
    prefix_forward,
    run_layers,
    stage_batches,
    stage_span,
    stage_trainable_params,
    teacher_layers_for,
    train_frontier,
)
from semalign.pairing import pair_layers
from semalign.suite.cache import TeacherCache, build_teacher_cache
from semalign.suite.models import load_model
from semalign.suite.registry import TransferContext

FAST = {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-2}


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory):
    """(teacher_dir, student_dir, cache_path, pairing_path): teacher 4L -> student 2L, depth-ratio pairs (2, 4); the
    cache holds every teacher state (0 = embeddings .. 4), so any pairing and target can read it."""
    teacher, student = tiny_pair
    root = tmp_path_factory.mktemp("frontier")
    pairing = pair_layers(4, 2, "depth_ratio")
    (root / "pairing.json").write_text(json.dumps(pairing))
    qa = [("What is 2 + 3?", "So the answer is 5."), ("Name a prime.", "7 is prime."),
          ("Capital of France?", "Paris."), ("Is 4 even?", "Yes, 4 is even."), ("def f():", "    return 1")]
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa]
    build_teacher_cache(teacher, records, layers=list(range(5)), max_len=40, batch_size=4,
                        out_path=root / "cache.pt")
    m = aligned_map(load_model(student, device="cpu")[0].lm_head.weight, TeacherCache.load(root / "cache.pt").head_weight)
    torch.save(m, root / "map.pt")  # computed once: the SVD of a 49k-token head dominates a tiny run
    return teacher, student, root / "cache.pt", root / "pairing.json"


def _run_direct(setup, out_dir, pairing=None, **params):
    """train_frontier on a freshly loaded student; returns (initial state, model)."""
    teacher, student, cache_path, pairing_path = setup
    torch.manual_seed(0)
    model, _ = load_model(student, device="cpu", trainable=True)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cache = TeacherCache.load(cache_path)
    m = torch.load(cache_path.parent / "map.pt")
    cfg = SemAlignConfig(**{**FAST, **params})
    try:
        pairing = pairing or json.loads(pairing_path.read_text())
        model = train_frontier(model, cache, pairing, cfg, out_dir, seed=7, m=m)
    except StageLimitReached:
        pass
    return initial, model


def _changed(before, model):
    return sorted({k.split(".")[2] if k.startswith("model.layers.") else k for k, v in model.state_dict().items()
                   if not torch.equal(v, before[k])})


def test_run_layers_matches_hf_forward(setup):
    _, student, cache_path, _ = setup
    model, _ = load_model(student, device="cpu")
    c = TeacherCache.load(cache_path)
    ids, attn = c.input_ids[:3], c.attention_mask[:3]
    with torch.no_grad():
        h = run_layers(model, model.model.embed_tokens(ids), 1, 2, attn)
        logits = model.lm_head(model.model.norm(h))
        ref = model(input_ids=ids, attention_mask=attn).logits
        split = run_layers(model, run_layers(model, model.model.embed_tokens(ids), 1, 1, attn), 2, 2, attn)
    real = attn.bool()
    assert torch.allclose(logits[real], ref[real], atol=1e-5)
    assert torch.equal(split, h)
    assert run_layers(model, h, 3, 2, attn) is h


def test_prefix_forward_cuts_chunks_to_their_longest_row(setup):
    """Length-sorted, trimmed chunks give the untrimmed stream at every real token (regression: the prefix ran
    every chunk at the cache's full width, twice the work on mini), and leave padding positions as they were."""
    _, student, cache_path, _ = setup
    model, _ = load_model(student, device="cpu")
    c = TeacherCache.load(cache_path)
    ids, attn = c.input_ids, c.attention_mask
    assert attn.sum(1).min() < attn.shape[1]  # the fixture has rows of different lengths
    with torch.no_grad():
        h0 = model.model.embed_tokens(ids)
        ref = run_layers(model, h0, 1, 2, attn)
    out = prefix_forward(model, h0, 1, 2, attn, chunk=2)
    real = attn.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5)
    assert torch.equal(out[~real], h0[~real])


def test_prefix_runs_each_frozen_layer_once_and_nothing_after_the_last_stage(setup, tmp_path, monkeypatch):
    """Regression: the prefix was brought past the last stage (a full pass over every row that nothing read), and
    a resumed run rebuilt it even when no stage was left to train."""
    import semalign.frontier as frontier

    ran: list[int] = []
    real = frontier.prefix_forward

    def counting(model, h, start, end, *args):
        ran.extend(range(start, end + 1))
        return real(model, h, start, end, *args)

    monkeypatch.setattr(frontier, "prefix_forward", counting)
    _run_direct(setup, tmp_path / "a")  # stages 1, 2 of a 2-layer student
    assert ran == [1]
    ran.clear()
    _run_direct(setup, tmp_path / "a")  # everything checkpointed: nothing to bring up to date
    assert ran == []
    ran.clear()
    _run_direct(setup, tmp_path / "b", stop_after_stage=1)
    _run_direct(setup, tmp_path / "b")  # resumes at stage 2: layer 1 once, on the reloaded weights
    assert ran == [1]


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_only_layer_k_changes_at_stage_k(setup, tmp_path, trainable):
    before, after1 = _run_direct(setup, tmp_path / "a", trainable=trainable, stop_after_stage=1)
    assert _changed(before, after1) == ["0"]  # stage 1: only decoder layer 1 (index 0)
    stage1 = {k: v.clone() for k, v in after1.state_dict().items()}
    _, after2 = _run_direct(setup, tmp_path / "a", trainable=trainable)  # resumes at stage 2
    assert _changed(stage1, after2) == ["1"]  # stage 2: only layer 2; layer 1 bit-identical to its stage-1 value
    assert not any("lora" in k for k in after2.state_dict())  # LoRA merged away


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_resume_equals_uninterrupted(setup, tmp_path, trainable):
    from semalign.method import SemAlign

    teacher, student, cache_path, pairing_path = setup

    # the lora run takes M from the semantic_bases rule's file, the full run computes it from the two heads
    artifacts = {"cache": cache_path, "pairing": pairing_path,
                 **({"aligned_map": cache_path.parent / "map.pt"} if trainable == "lora" else {})}

    def ctx(name, **extra):
        return TransferContext(teacher=teacher, student=student, splits=tmp_path, task="gsm8k", out_dir=tmp_path / name,
                               seed=3, artifacts=artifacts,
                               params={**FAST, "epochs": 2, "trainable": trainable, **extra})

    straight = SemAlign().run(ctx("straight"))
    with pytest.raises(StageLimitReached, match="stopped after stage 1"):
        SemAlign().run(ctx("resumed", stop_after_stage=1))  # "killed" after stage 1
    assert len(list((tmp_path / "resumed/ckpt").glob("*/stage_1.pt"))) == 1 and not (tmp_path / "resumed/model").exists()
    resumed = SemAlign().run(ctx("resumed"))
    a, _ = load_model(straight, device="cpu")
    b, _ = load_model(resumed, device="cpu")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    rows = list(csv.DictReader(open(tmp_path / "resumed/loss_curve.csv")))
    assert (tmp_path / "straight/loss_curve.csv").read_text() == (tmp_path / "resumed/loss_curve.csv").read_text()
    # KD's budget: 5 rows / batch 4 = 2 steps x 2 epochs = 4 steps, 2 per stage
    assert [int(r["stage"]) for r in rows] == [1] * 2 + [2] * 2
    assert all(float(r["layer_loss"]) >= 0 and float(r["kl"]) >= 0 for r in rows)
    stats = json.loads((tmp_path / "straight/train_stats.json").read_text())
    assert stats["stages"] == [1, 2] and stats["trainable_params"] > 0
    assert stats["budget"] == {"examples": 5, "epochs": 2.0, "optimizer_steps": 4}
    # Regression: a changed config starts fresh in its own checkpoint dir instead of resuming stale stages.
    changed = SemAlign().run(ctx("resumed", lr=0.5))
    assert len(list((tmp_path / "resumed/ckpt").glob("*/stage_2.pt"))) == 2
    c, _ = load_model(changed, device="cpu")
    assert not all(torch.equal(v, sa[k]) for k, v in c.state_dict().items())


@pytest.mark.parametrize("params", [
    {"loss": "v1"}, {"loss": "acl"}, {"loss": "hidden_mse"}, {"loss": "kl_only"},
    {"loss": "v2", "recompose": "projector"}, {"loss": "v2", "kl_every_stage": False},
])
def test_every_variant_trains_layer_loss_down(setup, tmp_path, params):
    # full batch (5 rows): every step sees the same data, so first vs last step compares the same objective
    # 8 epochs x 1 step at KD's budget: 4 steps per stage
    _, model = _run_direct(setup, tmp_path, **{**params, "epochs": 8, "batch_size": 5, "micro_batch_size": 5})
    rows = list(csv.DictReader(open(tmp_path / "loss_curve.csv")))
    assert [(int(r["stage"]), int(r["step"])) for r in rows] == [(k, s) for k in (1, 2) for s in range(4)]
    for k in ("1", "2"):
        total = [float(r["total"]) for r in rows if r["stage"] == k]
        assert all(torch.isfinite(torch.tensor(total)))
        assert total[-1] < total[0], f"stage {k} objective did not go down: {total}"
    if params.get("kl_every_stage") is False:
        assert all(float(r["kl"]) == 0.0 for r in rows if r["stage"] == "1")
        assert all(float(r["kl"]) > 0.0 for r in rows if r["stage"] == "2")


def test_sparse_and_weighted_pairings(setup, tmp_path):
    # last_only: layer 1 is only run (prefix), never trained; the curve has stage 2 alone
    before, model = _run_direct(setup, tmp_path / "last", pairing=pair_layers(4, 2, "last_only"))
    assert _changed(before, model) == ["1"]
    assert {r["stage"] for r in csv.DictReader(open(tmp_path / "last/loss_curve.csv"))} == {"2"}
    # attributed_v1 (teacher layer 1 critical -> k† = 1, pair (l(1) = 2, 1)): only layer 1 trained, layer 2 frozen
    # in the output suffix; its curve has stage 1 alone, and stage 1 is the last stage so it trains the output KL
    v1 = pair_layers(4, 2, "attributed_v1", scores=[1.0, 0.0, 0.0, 0.0])
    assert [(q["student"], q["teacher"]) for q in v1["pairs"]] == [(1, [[2, 1.0]])]
    before, model = _run_direct(setup, tmp_path / "v1", pairing=v1)
    assert _changed(before, model) == ["0"]
    rows = list(csv.DictReader(open(tmp_path / "v1/loss_curve.csv")))
    assert {r["stage"] for r in rows} == {"1"} and all(float(r["kl"]) > 0 for r in rows)
    # an interpolated-style weighted target (teacher layers 2 and 3 mixed) for student layer 1
    mixed = {"strategy": "interpolated", "teacher_layers": 4, "student_layers": 2,
             "pairs": [{"student": 1, "teacher": [[2, 0.25], [3, 0.75]]}, {"student": 2, "teacher": [[4, 1.0]]}]}
    before, model = _run_direct(setup, tmp_path / "mixed", pairing=mixed, trainable="full")
    assert _changed(before, model) == ["0", "1"]


def test_nan_loss_stops_clearly_and_writes_nothing(setup, tmp_path):
    with pytest.raises(FloatingPointError, match="stage 1"):
        _run_direct(setup, tmp_path, lambda_layer=float("nan"))
    assert not (tmp_path / "ckpt/stage_1.pt").exists()


def test_config_errors_and_param_count(setup):
    with pytest.raises(ValueError, match="semalign.loss"):
        SemAlignConfig(loss="v9")
    model, _ = load_model(setup[1], device="cpu")
    # student: hidden 32, intermediate 64, 2 heads of 16, 1 kv head -> v: 32->16, o: 32->32, up: 32->64, down: 64->32
    assert stage_trainable_params(model, SemAlignConfig()) == 16 * ((32 + 16) + (32 + 32) + (32 + 64) + (64 + 32))


def test_kl_only_trains_the_output_at_every_stage(setup, tmp_path):
    """Regression: kl_only with kl_every_stage=false was refused, which kept KL-only off the mini ablations; it now
    trains the KL at every stage (its only term), so every stage has a nonzero KL and moves its layer."""
    before, model = _run_direct(setup, tmp_path, loss="kl_only", kl_every_stage=False)
    with open(tmp_path / "loss_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["stage"] for r in rows} == {"1", "2"}
    assert all(float(r["kl"]) > 0 and float(r["layer_loss"]) == 0 for r in rows)
    assert _changed(before, model) == ["0", "1"]


def test_missing_teacher_layers_is_a_clear_error(setup, tmp_path):
    teacher, student, cache_path, _ = setup
    model, _ = load_model(student, device="cpu", trainable=True)
    cache = TeacherCache.load(cache_path)
    cache.layers.pop(4)
    with pytest.raises(ValueError, match=r"lacks layers \[4\]"):
        train_frontier(model, cache, pair_layers(4, 2, "depth_ratio"), SemAlignConfig(**FAST), tmp_path, 0,
                       torch.load(cache_path.parent / "map.pt"))


def _count_steps(monkeypatch) -> list[int]:
    """Every AdamW.step call from now on appends to the returned list (the optimizer both trainers use)."""
    calls: list[int] = []
    step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        calls.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    return calls


@pytest.mark.parametrize("budget, per_stage", [("kd_steps", [2, 1]), ("epochs_per_stage", [3, 3])])
def test_semalign_takes_kds_optimizer_steps(setup, tmp_path, monkeypatch, budget, per_stage):
    """5 rows, batch 2, 1 epoch: KD takes ceil(5/2) = 3 steps; SemAlign at KD's budget takes 3 over its 2 stages
    (2 + 1: the first stage takes the remainder), at the paper's epochs per stage 3 per stage."""
    from semalign.suite.train import TrainConfig, fit

    params = {"epochs": 1, "batch_size": 2, "micro_batch_size": 2}
    calls = _count_steps(monkeypatch)
    cache = TeacherCache.load(setup[2])
    module = torch.nn.Linear(1, 1)
    fit(module, cache.tokens(), lambda rows, b: module(b["input_ids"][:, :1].float()).mean(),
        TrainConfig(trainable="full", **params), tmp_path / "kd", seed=7, tag="kd")
    kd_steps = len(calls)
    calls.clear()
    _run_direct(setup, tmp_path / "semalign", budget=budget, **params)
    rows = list(csv.DictReader(open(tmp_path / "semalign" / "loss_curve.csv")))
    assert kd_steps == 3
    assert len(calls) == sum(per_stage) and [sum(r["stage"] == str(k) for r in rows) for k in (1, 2)] == per_stage
    if budget == "kd_steps":
        assert len(calls) == kd_steps


def test_stage_batches_cut_kds_stream():
    """kd_steps: KD's batches, in KD's order, cut into consecutive runs (10 rows, batch 3: 4 steps x 2 epochs = 8
    over 3 stages = 3, 3, 2); epochs_per_stage: each stage its own full epochs."""
    from semalign.suite.train import batches

    cfg = SemAlignConfig(epochs=2, batch_size=3)
    runs = stage_batches(10, cfg, 3, seed=5)
    assert [len(r) for r in runs] == [3, 3, 2]
    kd = [b for e in range(2) for b in batches(10, 3, 5, e)]
    assert all(torch.equal(a, b) for a, b in zip([b for r in runs for b in r], kd, strict=True))
    per_stage = stage_batches(10, SemAlignConfig(epochs=2, batch_size=3, budget="epochs_per_stage"), 3, seed=5)
    assert [len(r) for r in per_stage] == [8, 8, 8]
    assert torch.equal(per_stage[1][0], batches(10, 3, 5, 2)[0])  # stage 2 starts at the stream's third epoch
    with pytest.warns(UserWarning, match="last 2 stages train no step"):
        assert [len(r) for r in stage_batches(4, SemAlignConfig(epochs=1, batch_size=4), 3, seed=0)] == [1, 0, 0]


# Hand tables, teacher depth 4, depth-ratio pairing t(k) = max(1, floor(4k / L_S)): (start, end) teacher states of
# every stage's residual target h_end - h_start. block: start = t(k-1), t(0) = 0; layer: start = t(k) - 1.
HAND_SPANS = {
    (2, "block"): [(0, 2), (2, 4)],  # integer ratio: t = 2, 4
    (2, "layer"): [(1, 2), (3, 4)],
    (3, "block"): [(0, 1), (1, 2), (2, 4)],  # 4/3: t = 1, 2, 4
    (3, "layer"): [(0, 1), (1, 2), (3, 4)],
    (6, "block"): [(0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 4)],  # deeper student: t = 1, 1, 2, 2, 3, 4
    (6, "layer"): [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (3, 4)],
}


def test_stage_span_by_hand():
    for (L_S, target), spans in HAND_SPANS.items():
        pairing = pair_layers(4, L_S, "depth_ratio")
        states = "block" if target == "block" else "residual"
        got = [stage_span(pairing, k, states) for k in range(1, L_S + 1)]
        assert got == [([[end, 1.0]], [[start, 1.0]]) for start, end in spans], (L_S, target)
        assert [stage_span(pairing, k, "end") for k in range(1, L_S + 1)] == [([[e, 1.0]], None) for _, e in spans]
    # a student layer the pairing does not list stands for its depth-ratio layer: last_only 4 -> 2 starts at t(1) = 2
    assert stage_span(pair_layers(4, 2, "last_only"), 2, "block") == ([[4, 1.0]], [[2, 1.0]])
    # weighted pairs: the block starts at the previous pair's weighted state
    mixed = {"strategy": "interpolated", "teacher_layers": 4, "student_layers": 2,
             "pairs": [{"student": 1, "teacher": [[2, 0.25], [3, 0.75]]}, {"student": 2, "teacher": [[4, 1.0]]}]}
    assert stage_span(mixed, 2, "block") == ([[4, 1.0]], [[2, 0.25], [3, 0.75]])
    assert teacher_layers_for(mixed, "block") == [0, 2, 3, 4] and teacher_layers_for(mixed, "residual") == [1, 2, 3, 4]
    backwards = {**mixed, "pairs": [{"student": 1, "teacher": [[3, 1.0]]}, {"student": 2, "teacher": [[2, 1.0]]}]}
    with pytest.raises(ValueError, match="depth order"):
        stage_span(backwards, 2, "block")
    # what the config reads, hence what SemAlign asks the cache for
    assert SemAlignConfig().states == "block" and SemAlignConfig(target="layer").states == "residual"
    assert SemAlignConfig(loss="acl").states == "end" and SemAlignConfig(interface="output").states == "end"
    with pytest.raises(ValueError, match="semalign.target"):
        SemAlignConfig(target="blocks")


def _states(model, rows: dict) -> dict[int, torch.Tensor]:
    """Residual stream after every layer (0 = embeddings) from a plain HF forward with hooks, fp32."""
    out: dict[int, torch.Tensor] = {}
    mods = [model.model.embed_tokens, *model.model.layers]
    hooks = [m.register_forward_hook(lambda _m, _i, o, j=j: out.__setitem__(j, (o[0] if isinstance(o, tuple) else o)
                                                                               .detach().float()))
             for j, m in enumerate(mods)]
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits.float()
    for h in hooks:
        h.remove()
    out["logits"] = logits
    return out


@pytest.fixture(scope="module")
def deep_students(tiny_pair, tokenizer_dir, tmp_path_factory):
    """Students of depth 2 (the tiny pair's), 3 (non-integer ratio 4/3) and 6 (deeper than the teacher)."""
    from semalign.suite.models import prepare_model

    root = tmp_path_factory.mktemp("students")
    dirs = {2: tiny_pair[1]}
    for depth in (3, 6):
        spec = {"random": {"num_hidden_layers": depth, "hidden_size": 32, "intermediate_size": 64,
                           "num_attention_heads": 2, "num_key_value_heads": 1}, "tokenizer": {"source": str(tokenizer_dir)}}
        prepare_model(spec, root / f"s{depth}", seed=depth)
        dirs[depth] = root / f"s{depth}"
    return dirs


def _record_stage_inputs(monkeypatch, loss: str = "v2") -> tuple[list[dict], list[torch.Tensor]]:
    """Make every stage see all rows in order in one step and record what the trainer hands the objective: the
    layer term's arguments and the student logits of the output term."""
    import semalign.frontier as frontier
    from semalign.losses import LOSSES

    calls: list[dict] = []
    logits: list[torch.Tensor] = []
    objective = LOSSES[loss]
    layer, output = type(objective).layer, type(objective).output

    def recording(student, target, mask):
        calls.append({"student": student.detach().clone(), "target": target.detach().clone(), "mask": mask.clone()})
        return layer(objective, student, target, mask)

    def recording_output(student_logits, *args):
        if student_logits is not None:
            logits.append(student_logits.detach().clone())
        return output(objective, student_logits, *args)

    monkeypatch.setattr(objective, "layer", recording)
    monkeypatch.setattr(objective, "output", recording_output)
    monkeypatch.setattr(frontier, "batches", lambda n, bs, seed, epoch: [torch.arange(n)])
    return calls, logits


@pytest.mark.parametrize("L_S,target", sorted(HAND_SPANS))
def test_trainer_feeds_each_stage_the_hand_target(setup, deep_students, tmp_path, monkeypatch, L_S, target):
    """Stage k's loss receives M (h_end - h_start) with (start, end) from HAND_SPANS, teacher states from a plain
    HF forward (not the cache), and, at stage 1, the student's own Δ_1 = h_1 - h_0 (the residual interface)."""
    teacher_dir, _, cache_path, _ = setup
    cache = TeacherCache.load(cache_path)
    rows = {"input_ids": cache.input_ids, "attention_mask": cache.attention_mask}
    teacher, _ = load_model(teacher_dir, device="cpu", trainable=True)
    h_t = _states(teacher, rows)
    model, _ = load_model(deep_students[L_S], device="cpu", trainable=True)
    h_s = _states(model, rows)
    m = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) / 8
    calls, _ = _record_stage_inputs(monkeypatch)
    cfg = SemAlignConfig(**{**FAST, "batch_size": 5, "micro_batch_size": 5, "trainable": "full", "target": target,
                            "kl_every_stage": False, "budget": "epochs_per_stage"})  # one step in every stage
    train_frontier(model, cache, pair_layers(4, L_S, "depth_ratio"), cfg, tmp_path, seed=0, m=m)
    assert len(calls) == L_S  # one step per stage
    for k, ((start, end), call) in enumerate(zip(HAND_SPANS[L_S, target], calls), start=1):
        T = call["target"].shape[1]
        real = rows["attention_mask"][:, :T].bool()
        assert torch.equal(call["mask"].bool(), real)
        expect = (h_t[end] - h_t[start])[:, :T] @ m.T
        assert torch.allclose(call["target"][real], expect[real], rtol=1e-4, atol=1e-5), f"stage {k}"
    real = rows["attention_mask"][:, : calls[0]["student"].shape[1]].bool()
    first = (h_s[1] - h_s[0])[:, : real.shape[1]]
    assert torch.allclose(calls[0]["student"][real], first[real], rtol=1e-4, atol=1e-5)


def test_step0_losses_recomputed_from_raw_states(setup, tmp_path, monkeypatch):
    """Each stage's logged step-0 layer loss and KL equal the loss recomputed from raw states: the student with
    layers < k trained and layer k untouched (plain HF forward), the teacher's own forward, the hand KL over the
    answer positions (position t predicts token t+1). Catches a wrong student quantity, a skipped suffix layer,
    a wrong KL direction or token mask anywhere in the stage."""
    from semalign.losses import relation_loss

    teacher_dir, student_dir, cache_path, _ = setup
    cache = TeacherCache.load(cache_path)
    rows = {"input_ids": cache.input_ids, "attention_mask": cache.attention_mask}
    h_t = _states(load_model(teacher_dir, device="cpu", trainable=True)[0], rows)
    m = torch.load(cache_path.parent / "map.pt")
    _, logits = _record_stage_inputs(monkeypatch)
    initial, trained = _run_direct(setup, tmp_path, batch_size=5, micro_batch_size=5, trainable="full",
                                   kl_every_stage=True, lr=0.05, budget="epochs_per_stage")  # a step per stage
    curve = {(int(r["stage"]), int(r["step"])): r for r in csv.DictReader(open(tmp_path / "loss_curve.csv"))}
    lm = cache.loss_mask
    answer = torch.zeros_like(lm, dtype=torch.bool)
    answer[:, :-1] = lm[:, 1:].bool()
    real = rows["attention_mask"].bool()
    for k, (start, end) in enumerate(HAND_SPANS[2, "block"], start=1):
        model, _ = load_model(student_dir, device="cpu", trainable=True)
        untouched = {n: v for n, v in initial.items() if n.startswith("model.layers.") and int(n.split(".")[2]) >= k - 1}
        model.load_state_dict({**trained.state_dict(), **untouched})  # the student as stage k found it
        h_s = _states(model, rows)
        target = (h_t[end] - h_t[start]) @ m.T
        layer = relation_loss(h_s[k] - h_s[k - 1], target, real)
        log_p = torch.log_softmax(h_t["logits"][answer], -1)
        log_q = torch.log_softmax(h_s["logits"][answer], -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        # the output term reads the whole suffix k+1..L_S: the logits are the plain forward's, to float precision,
        # and visibly not those of a suffix missing its last layer
        assert torch.allclose(logits[k - 1][0], h_s["logits"][answer], atol=1e-4), f"stage {k}"
        skipped = model.lm_head(model.model.norm(h_s[1]))[answer] if k == 1 else None
        assert skipped is None or (skipped - h_s["logits"][answer]).abs().max() > 1e-2
        assert float(curve[k, 0]["layer_loss"]) == pytest.approx(layer.item(), rel=1e-4), f"stage {k}"
        assert float(curve[k, 0]["kl"]) == pytest.approx(kl.item(), rel=2e-3), f"stage {k}"
    assert not torch.equal(trained.state_dict()["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
