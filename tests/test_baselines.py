"""LoRA-SFT and layer-wise KD: the math of their losses and projectors, and that training moves what it should."""
import json

import pytest
import torch

from baselines.layerwise_kd import make_projectors, normalised_mse
from semalign.pairing import pair_layers
from semalign.suite.cache import build_teacher_cache, layer_outputs
from semalign.suite.chat import tokenize_records
from semalign.suite.io import read_jsonl, write_jsonl
from semalign.suite.models import load_model
from semalign.suite.objectives import sft_loss
from semalign.suite.registry import TransferContext, get_method


@pytest.fixture
def splits(chat_records, tmp_path):
    out = tmp_path / "splits"
    out.mkdir()
    write_jsonl(out / "train.jsonl", chat_records)
    return out


def _ctx(tiny_pair, splits, out_dir, params, **kw):
    teacher, student = tiny_pair
    return TransferContext(teacher=teacher, student=student, splits=splits, task="gsm8k", out_dir=out_dir,
                           seed=1, max_len=48, params=params, **kw)


def _train_ce(model_dir, splits):
    model, tok = load_model(model_dir)
    b = tokenize_records(tok, read_jsonl(splits / "train.jsonl"), 48)
    with torch.no_grad():
        return sft_loss(model, b).item()


def test_lora_sft_lowers_train_ce_without_teacher(tiny_pair, splits, tmp_path):
    ctx = _ctx(tiny_pair, splits, tmp_path / "sft", {"epochs": 3, "batch_size": 3, "micro_batch_size": 2, "lr": 1e-2})
    out = get_method("lora_sft").run(ctx)
    assert _train_ce(out, splits) < _train_ce(tiny_pair[1], splits) - 0.1
    stats = json.loads((ctx.out_dir / "train_stats.json").read_text())
    # Seeking's targets, r=16: r (in + out) per projection of 2 layers (q 32->32, k/v 32->16, o 32->32, gate/up
    # 32->64, down 64->32), plus the embedding (r (V + d)) and the head (r (d + V)), V = 49152 (SmolLM2)
    layer = (32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64)
    assert stats["trainable_params"] == 16 * (2 * layer + 2 * (49152 + 32))
    assert stats["budget"] == {"examples": 6, "epochs": 3.0, "optimizer_steps": 6}
    assert (ctx.out_dir / "loss_curve.csv").read_text().count("\n") == 1 + 3 * 2


def test_lora_sft_missing_split_is_named(tiny_pair, tmp_path):
    ctx = _ctx(tiny_pair, tmp_path, tmp_path / "sft", {})
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        get_method("lora_sft").run(ctx)


def test_normalised_mse():
    t = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5)
    assert normalised_mse(t, t, mask).item() == 0.0
    assert normalised_mse(torch.zeros_like(t), t, mask).item() == pytest.approx(1.0)
    # masked positions never count, whatever they hold
    mask[1, 3:] = 0
    garbage = t.clone()
    garbage[1, 3:] = 1e6
    assert normalised_mse(garbage, t, mask).item() == 0.0


def test_projectors_map_student_width_to_teacher_width():
    pairs = [{"student": 1, "teacher": [[2, 1.0]]}, {"student": 2, "teacher": [[4, 1.0]]}]
    proj = make_projectors(pairs, d_student=32, d_teacher=64)
    assert sorted(proj) == ["1", "2"]
    assert proj["1"](torch.randn(3, 7, 32)).shape == (3, 7, 64)
    assert proj["2"].weight.shape == (64, 32)


def _hidden_states(model_dir, cache_path, pairing):
    """The student's residual stream after each paired layer on the cached rows (real tokens only)."""
    from semalign.suite.cache import TeacherCache

    c = TeacherCache.load(cache_path)
    model, _ = load_model(model_dir)
    store, _, handles = layer_outputs(model, [p["student"] for p in pairing["pairs"]])
    with torch.no_grad():
        model(input_ids=c.input_ids, attention_mask=c.attention_mask)
    mask = c.attention_mask.bool()
    return {p["student"]: store[p["student"]][0][mask] for p in pairing["pairs"]}


def test_layerwise_kd_trains_student_and_projectors(tiny_pair, chat_records, splits, tmp_path):
    teacher, student = tiny_pair
    pairing = pair_layers(4, 2, "depth_ratio")
    (tmp_path / "pairing.json").write_text(json.dumps(pairing))
    cache = tmp_path / "teacher.pt"
    build_teacher_cache(teacher, chat_records, layers=[2, 4], max_len=48, batch_size=4, out_path=cache)
    params = {"epochs": 3, "batch_size": 3, "micro_batch_size": 2, "lr": 1e-2, "trainable": "full"}
    ctx = _ctx(tiny_pair, splits, tmp_path / "lkd", params, artifacts={"cache": cache, "pairing": tmp_path / "pairing.json"})
    out = get_method("layerwise_kd").run(ctx)
    stats = json.loads((ctx.out_dir / "train_stats.json").read_text())
    assert stats["projector_params"] == 2 * (32 * 64 + 64)
    n_student = sum(p.numel() for p in load_model(student)[0].parameters())
    assert stats["trainable_params"] == n_student + stats["projector_params"]
    curve = [float(line.rsplit(",", 1)[1]) for line in (ctx.out_dir / "loss_curve.csv").read_text().split()[1:]]
    assert curve[-1] < curve[0]
    before, after = (_hidden_states(m, cache, pairing) for m in (student, out))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the hidden states themselves moved


def test_layerwise_kd_needs_pairing(tiny_pair, splits, tmp_path):
    ctx = _ctx(tiny_pair, splits, tmp_path / "lkd", {}, artifacts={"cache": tmp_path / "none.pt"})
    with pytest.raises(ValueError, match="pairing"):
        get_method("layerwise_kd").run(ctx)


def test_empty_split_is_named_before_training(tiny_pair, tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    ctx = _ctx(tiny_pair, tmp_path, tmp_path / "sft", {})
    with pytest.raises(ValueError, match=r"train.jsonl is empty"):
        get_method("lora_sft").run(ctx)


def test_lora_on_tied_embeddings_merges_what_it_trained():
    """Regression: LoRA on both uses of a tied embedding merged both deltas into the one shared matrix, so the saved
    model's embedding carried the head's delta and vice versa; prepare_trainable now unties them first."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from baselines.lora_sft import LoRASFTConfig
    from semalign.suite.lora import prepare_trainable

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    peft_model = prepare_trainable(model, LoRASFTConfig()).eval()  # eval: no LoRA dropout
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)  # a trained adapter: both B and A nonzero
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        trained = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert torch.allclose(trained, merged, atol=1e-5)
