import math

import pytest
import torch
from transformers import AutoTokenizer

from semalign.suite.chat import tokenize_records
from semalign.suite.objectives import output_kl, shift_mask
from semalign.suite.train import batches, trim


def test_kl_zero_for_identical_and_matches_hand_value():
    z = torch.randn(2, 3, 5)
    mask = torch.ones(2, 3)
    assert output_kl(z, z, mask).item() == pytest.approx(0.0, abs=1e-6)
    # two-way distribution: teacher (0.5, 0.5), student (0.25, 0.75): KL = 0.5 ln 2 + 0.5 ln(2/3)
    t = torch.log(torch.tensor([[[0.5, 0.5]]]))
    s = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expect = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert output_kl(s, t, torch.ones(1, 1)).item() == pytest.approx(expect, rel=1e-5)


def test_kl_respects_mask():
    s, t = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    mask = torch.tensor([[0, 1, 0, 0]])
    assert output_kl(s, t, mask).item() == pytest.approx(output_kl(s[:, 1:2], t[:, 1:2], torch.ones(1, 1)).item(), rel=1e-5)


def test_tokenize_masks_only_the_answer(tokenizer_dir, chat_records):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = tokenize_records(tok, chat_records, max_len=64)
    assert data["input_ids"].shape == data["loss_mask"].shape
    for i, rec in enumerate(chat_records):
        ids = data["input_ids"][i][data["loss_mask"][i].bool()]
        answer = rec["messages"][-1]["content"]
        assert answer.strip().split()[0] in tok.decode(ids), (answer, tok.decode(ids))
        assert "user" not in tok.decode(ids)
    full = tokenize_records(tok, chat_records, max_len=64, train_on_inputs=True)
    assert (full["loss_mask"].sum(1) > data["loss_mask"].sum(1)).all()


def test_tokenize_rejects_bad_records(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="empty split"):
        tokenize_records(tok, [], 16)
    with pytest.raises(ValueError, match="no final assistant"):
        tokenize_records(tok, [{"id": "x", "messages": [{"role": "user", "content": "hi"}]}], 16)


def test_batches_deterministic_and_cover():
    a, b = batches(10, 3, seed=0, epoch=1), batches(10, 3, seed=0, epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(10))
    assert not all(torch.equal(x, y) for x, y in zip(a, batches(10, 3, seed=0, epoch=2)))


def test_shift_and_trim():
    m = torch.tensor([[0, 0, 1, 1, 0]])
    assert shift_mask(m).tolist() == [[0, 1, 1, 0, 0]]
    b = {"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]), "input_ids": torch.zeros(2, 4)}
    assert trim(b)["input_ids"].shape == (2, 2)


def test_method_config_rejects_unknown():
    from semalign.suite.registry import get_method

    kd = get_method("kd")
    assert kd.config({"lr": 0.1}).lr == 0.1
    with pytest.raises(ValueError, match="unknown parameter.*'lrr'"):
        kd.config({"lrr": 0.1})
    with pytest.raises(ValueError, match="trainable"):
        kd.config({"trainable": "some"})
    with pytest.raises(ValueError, match="takes no parameters"):
        get_method("none").config({"x": 1})


def _toy_data(n: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.arange(n * 4).reshape(n, 4) % 7
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


def test_fit_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    from semalign.suite.train import TrainConfig, fit

    model = torch.nn.Linear(4, 1)
    poison = {"on": False}

    def loss_fn(rows, b):
        loss = model(b["input_ids"].float()).pow(2).mean()
        return loss * float("nan") if poison["on"] else loss

    cfg = TrainConfig(trainable="full", epochs=1, batch_size=3, micro_batch_size=3, lr=1e-2)
    fit(model, _toy_data(), loss_fn, cfg, tmp_path, seed=0, tag="toy")
    (ckpt,) = tmp_path.glob("ckpt/*/last.pt")
    good = torch.load(ckpt, weights_only=False)
    poison["on"] = True
    cfg.epochs = 2  # constant schedule: extending resumes the same checkpoint
    with pytest.raises(FloatingPointError, match="toy epoch 2 step 0"):
        fit(model, _toy_data(), loss_fn, cfg, tmp_path, seed=0, tag="toy")
    kept = torch.load(ckpt, weights_only=False)
    assert kept["epoch"] == 1 and all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


def test_linear_schedule_warms_up_and_decays():
    from semalign.suite.train import TrainConfig, lr_schedule

    cfg = TrainConfig(lr=1.0, schedule="linear", warmup_ratio=0.25)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = lr_schedule(opt, cfg, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 2 warmup steps (0.5, 1.0), then linear decay over the remaining 6: 1, 5/6, ..., 1/6
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_train_config_rejects_bad_values():
    from semalign.suite.train import TrainConfig

    for bad in ({"trainable": "half"}, {"schedule": "cosine"}, {"epochs": 0}, {"warmup_ratio": 1.0}):
        with pytest.raises(ValueError, match="TrainConfig"):
            TrainConfig(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_requested_without_gpu_is_one_clear_error():
    from semalign.suite.pipeline import resolve_device

    with pytest.raises(RuntimeError, match="device='cuda' requested but no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"


def test_ce_of_rows_without_answer_tokens_is_zero_not_nan():
    """Regression: a micro-batch whose answers were all truncated away made LaTen's step NaN."""
    from semalign.suite.objectives import answer_ce

    assert answer_ce(torch.randn(0, 11, requires_grad=True), torch.zeros(0, dtype=torch.long)).item() == 0.0


def test_answer_logits_equal_the_full_forward_at_scored_positions(tiny_pair, chat_records):
    """Reading out only at answer positions is the same math as the full forward, masked afterwards."""
    from semalign.suite.models import load_model
    from semalign.suite.objectives import answer_ce, answer_logits

    model, tok = load_model(tiny_pair[1], trainable=True)
    model.eval()
    b = tokenize_records(tok, chat_records, 48)
    with torch.no_grad():
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits, labels, mask = answer_logits(model, b)
    pred = shift_mask(b["loss_mask"]).bool()
    assert torch.equal(mask, pred) and len(labels) == int(pred.sum())
    assert torch.allclose(logits, full[pred], atol=1e-5)
    assert torch.equal(labels, b["input_ids"][:, 1:][pred[:, :-1]])
    expected = torch.nn.functional.cross_entropy(full[:, :-1][pred[:, :-1]], b["input_ids"][:, 1:][pred[:, :-1]])
    assert torch.allclose(answer_ce(logits, labels), expected, atol=1e-5)


def test_exploding_lr_is_a_divergence_error_even_at_the_last_step(tmp_path):
    """Regression (issue 14): lr 1e12 trained with finite losses to weights of norm ~1e12 and the table showed the
    result. One step (so the loss, computed before the step, never sees it): only the post-step check can."""
    from semalign.suite.train import DivergenceError, TrainConfig, fit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    cfg = TrainConfig(trainable="full", epochs=1, batch_size=6, micro_batch_size=6, lr=1e12)
    with pytest.raises(DivergenceError, match=r"toy epoch 1 step 0: trainable weight norm .* > 100 x initial"):
        fit(model, _toy_data(), lambda rows, b: model(b["input_ids"].float()).pow(2).mean(), cfg, tmp_path, 0, "toy")
    assert not list(tmp_path.glob("ckpt/*/last.pt"))  # nothing of the diverged epoch is kept


def test_exploding_loss_with_tame_weights_is_a_divergence_error(tmp_path):
    """A loss 1000x its first value stops the run (divergence_factor 100) though the weights never move (zero
    gradient); with divergence_factor 2000 the same run passes: the threshold is the config's."""
    from semalign.suite.train import DivergenceError, TrainConfig, fit

    for factor, fails in ((100.0, True), (2000.0, False)):
        model, losses = torch.nn.Linear(4, 1), iter([1.0] + [1000.0] * 2)
        cfg = TrainConfig(trainable="full", epochs=1, batch_size=2, micro_batch_size=2, divergence_factor=factor)

        def loss_fn(rows, b):
            return model(b["input_ids"].float()).sum() * 0 + next(losses)

        if fails:
            with pytest.raises(DivergenceError, match=r"toy epoch 1 step 1: loss 1000 > 100 x first-step loss 1 "):
                fit(model, _toy_data(), loss_fn, cfg, tmp_path / "a", 0, "toy")
        else:
            fit(model, _toy_data(), loss_fn, cfg, tmp_path / "b", 0, "toy")


@pytest.mark.parametrize("bad", [{"lr": 0.0}, {"lr": -1e-3}, {"divergence_factor": 1.0}])
def test_train_config_rejects_nonpositive_lr_and_factor(bad):
    from semalign.suite.train import TrainConfig

    with pytest.raises(ValueError, match="lr must be > 0 and divergence_factor > 1"):
        TrainConfig(**bad)
