"""KD end to end on a tiny pair: the cache is exact, training moves the student towards the teacher, resume."""
import pytest
import torch

from semalign.suite.cache import TeacherCache, build_teacher_cache
from semalign.suite.models import load_model
from semalign.suite.objectives import output_kl, shift_mask
from semalign.suite.registry import TransferContext, get_method


@pytest.fixture
def cache(tiny_pair, chat_records, tmp_path):
    teacher, _ = tiny_pair
    path = tmp_path / "teacher.pt"
    meta = build_teacher_cache(teacher, chat_records, layers=[0, 2], max_len=48, batch_size=4, out_path=path)
    assert meta["forward_passes"] == len(chat_records)
    return path


def test_cache_logits_and_layers_match_teacher(tiny_pair, cache):
    teacher, _ = tiny_pair
    c = TeacherCache.load(cache)
    model, _ = load_model(teacher)
    with torch.no_grad():
        out = model(input_ids=c.input_ids, attention_mask=c.attention_mask, output_hidden_states=True)
    mask = c.attention_mask.bool()
    idx = torch.arange(len(c))
    assert torch.allclose(c.answer_logits(idx, mask, c.head_weight), out.logits[mask], atol=2e-2)
    assert torch.allclose(c.layer(2).float()[mask], out.hidden_states[2][mask], atol=1e-2)
    with pytest.raises(KeyError, match="not cached"):
        c.layer(1)


def _kd(tiny_pair, cache, tmp_path, name, **params):
    teacher, student = tiny_pair
    ctx = TransferContext(teacher=teacher, student=student, splits=tmp_path, task="gsm8k",
                          out_dir=tmp_path / name, artifacts={"cache": cache}, seed=3,
                          params={"batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, **params})
    return get_method("kd").run(ctx), ctx


def _kl_to_teacher(model_dir, cache):
    c = TeacherCache.load(cache)
    model, _ = load_model(model_dir)
    with torch.no_grad():
        logits = model(input_ids=c.input_ids, attention_mask=c.attention_mask).logits
    mask = shift_mask(c.loss_mask).bool()
    return output_kl(logits[mask], c.answer_logits(torch.arange(len(c)), mask, c.head_weight),
                     torch.ones(int(mask.sum()))).item()


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_kd_reduces_kl(tiny_pair, cache, tmp_path, trainable):
    out, ctx = _kd(tiny_pair, cache, tmp_path, trainable, epochs=4, trainable=trainable)
    assert _kl_to_teacher(out, cache) < _kl_to_teacher(tiny_pair[1], cache)
    assert (ctx.out_dir / "loss_curve.csv").read_text().count("\n") == 1 + 4 * 2


def test_kd_resume_equals_uninterrupted(tiny_pair, cache, tmp_path):
    straight, _ = _kd(tiny_pair, cache, tmp_path, "straight", epochs=2, trainable="full")
    _kd(tiny_pair, cache, tmp_path, "resumed", epochs=1, trainable="full")  # "killed" after epoch 1
    (ckpt,) = (tmp_path / "resumed" / "ckpt").glob("*/last.pt")
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    resumed, _ = _kd(tiny_pair, cache, tmp_path, "resumed", epochs=2, trainable="full")
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2  # same checkpoint continued, not a fresh run
    a, _ = load_model(straight)
    b, _ = load_model(resumed)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_kd_changed_config_starts_fresh(tiny_pair, cache, tmp_path):
    """Regression: a re-run with changed hyperparameters must not resume the old run's checkpoint."""
    _kd(tiny_pair, cache, tmp_path, "run", epochs=1, trainable="full")
    _kd(tiny_pair, cache, tmp_path, "run", epochs=1, trainable="full", lr=5e-3)
    assert len(list((tmp_path / "run" / "ckpt").glob("*/last.pt"))) == 2


def test_run_transfer_counts_layer_passes(tiny_pair, cache, tmp_path):
    """The cost record counts every student-layer pass: KD runs all 2 layers forward and backward once per
    example and epoch, and never runs the teacher (its logits come from the cache)."""
    from semalign.suite.pipeline import run_transfer

    teacher, student = tiny_pair
    ctx = TransferContext(teacher=teacher, student=student, splits=tmp_path, task="gsm8k", out_dir=tmp_path / "kd",
                          artifacts={"cache": cache}, params={"epochs": 2, "batch_size": 4, "micro_batch_size": 2})
    record = run_transfer("kd", ctx, tmp_path / "kd" / "transfer.json")
    n, layers, epochs = 6, 2, 2
    passes = record["layer_passes"]
    assert passes["student_layer_forward_rows"] == n * layers * epochs
    assert passes["student_layer_backward_rows"] == n * layers * epochs
    assert not any(k.startswith(("teacher", "other")) for k in passes)


def test_kd_step0_loss_is_the_hand_tempered_forward_kl(tiny_pair, chat_records, tmp_path, monkeypatch):
    """KD's first logged loss (one full batch, untouched student) equals T^2 KL(p_T || p_S) at temperature T = 2,
    averaged over the answer-predicting positions only (position t predicts token t+1), computed here from the two
    models' own forwards. The teacher's final-norm gain is raised 30x so its distributions are peaked and differ per
    position (a random tiny teacher is near uniform, where forward and reverse KL and any token subset agree):
    a reverse KL, an ignored temperature or prompt tokens in the mean then each miss by far more than fp16's error."""
    import csv

    import baselines.kd as kd
    import semalign.suite.train as train

    teacher, student = tiny_pair
    sharp, tok = load_model(teacher, trainable=True)
    with torch.no_grad():
        sharp.model.norm.weight.mul_(30.0)
    sharp.save_pretrained(tmp_path / "sharp")
    tok.save_pretrained(tmp_path / "sharp")
    cache = tmp_path / "sharp.pt"
    build_teacher_cache(tmp_path / "sharp", chat_records, layers=[], max_len=48, batch_size=6, out_path=cache)
    c = TeacherCache.load(cache)
    rows = {"input_ids": c.input_ids, "attention_mask": c.attention_mask}
    with torch.no_grad():
        z_t = sharp.eval()(**rows).logits.double()
        z_s = load_model(student)[0](**rows).logits.double()
    answer = torch.zeros_like(c.loss_mask, dtype=torch.bool)
    answer[:, :-1] = c.loss_mask[:, 1:].bool()
    assert 0 < answer.sum() < c.attention_mask.sum() - len(c)  # the prompt positions are many and excluded
    log_p = torch.log_softmax(z_t[answer] / 2, -1)
    log_q = torch.log_softmax(z_s[answer] / 2, -1)
    expect = 4 * (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    seen: list[torch.Tensor] = []
    real_kl = kd.output_kl
    monkeypatch.setattr(kd, "output_kl", lambda s, t, *a: seen.append(s.detach().clone()) or real_kl(s, t, *a))
    monkeypatch.setattr(train, "batches", lambda n, bs, seed, epoch: [torch.arange(n)])  # rows in order
    out, ctx = _kd(tiny_pair, cache, tmp_path, "t2", epochs=1, trainable="full", batch_size=6, micro_batch_size=6,
                   temperature=2.0)
    assert torch.allclose(seen[0].double(), z_s[answer], atol=1e-4)  # the student's logits at the answer positions
    first = next(csv.DictReader(open(ctx.out_dir / "loss_curve.csv")))
    assert float(first["loss"]) == pytest.approx(expect, rel=2e-3)


def test_cache_keeps_layer_differences_under_a_huge_norm_token(tiny_pair, chat_records, tmp_path):
    """Regression (attention sink: ||h|| ~ 2.5e4 on SmolLM2): fp16 states lost the layers' contributions at that
    token (cosine 0.796 to fp32 on the real teacher). A teacher whose first token enters with norm 3e4: every
    difference of cached states keeps cosine >= 0.999 to a fresh fp32 forward at every real position, where the
    same states rounded to fp16 do not."""
    from semalign.suite.chat import tokenize_records

    model, tok = load_model(tiny_pair[0], trainable=True)
    first = int(tokenize_records(tok, chat_records, 48)["input_ids"][0, 0])
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        emb[first] = 3e4 * emb[first] / emb[first].norm()
    model.save_pretrained(tmp_path / "sink")
    tok.save_pretrained(tmp_path / "sink")
    build_teacher_cache(tmp_path / "sink", chat_records, layers=list(range(5)), max_len=48, batch_size=4,
                        out_path=tmp_path / "sink.pt")
    c = TeacherCache.load(tmp_path / "sink.pt")
    ref: dict[int, torch.Tensor] = {}
    mods = [model.model.embed_tokens, *model.model.layers]
    hooks = [m.register_forward_hook(lambda _m, _i, o, j=j: ref.__setitem__(j, o[0] if isinstance(o, tuple) else o))
             for j, m in enumerate(mods)]
    with torch.no_grad():
        model(input_ids=c.input_ids, attention_mask=c.attention_mask)
    for h in hooks:
        h.remove()
    real = c.attention_mask.bool()
    assert ref[4][:, 0].norm(dim=-1).min() > 1e4  # the planted token keeps its huge norm through every layer
    cos = torch.nn.functional.cosine_similarity
    worst_fp16 = 1.0
    for lo, hi in ((0, 1), (1, 2), (2, 3), (3, 4), (0, 4)):
        want = (ref[hi] - ref[lo])[real].double()
        got = (c.layer(hi).double() - c.layer(lo).double())[real]
        assert cos(got, want, dim=-1).min() >= 0.999, (lo, hi)
        fp16 = (ref[hi].half().double() - ref[lo].half().double())[real]
        worst_fp16 = min(worst_fp16, cos(fp16, want, dim=-1).min().item())
    assert worst_fp16 < 0.999  # the planted token does break fp16 storage


def test_output_kl_of_bf16_logits_is_reduced_in_fp32():
    """The paper's models give bf16 logits; the KL must be the fp32 KL of those same values (the softmax, the
    log-ratio and the sums in fp32), dtype fp32. A log-softmax taken in bf16 (steps of ~0.03 at |log p| ~ 10 over
    a 49k vocabulary) is off by far more than fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(6, 49152, generator=g).bfloat16() for _ in range(2))
    mask = torch.ones(6)
    got = output_kl(s, t, mask, temperature=2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(output_kl(s.float(), t.float(), mask, temperature=2.0).item(), rel=1e-6)
