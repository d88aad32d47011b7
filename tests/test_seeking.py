"""Seeking: sensitivity against hand sums and naive autograd, layer selection, the block search against brute
force, SVD optimality, injection leaves the student's function unchanged, and end to end."""
import copy
import csv
import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import baselines.seeking as seeking
from baselines.seeking import (
    SeekingConfig,
    best_subblock,
    extract_factors,
    inject,
    layer_scores,
    lora_factors,
    paired_modules,
    select_layers,
    sensitivity,
)
from semalign.suite.chat import tokenize_records
from semalign.suite.io import write_jsonl
from semalign.suite.models import load_model
from semalign.suite.objectives import sft_loss
from semalign.suite.pipeline import run_preparation
from semalign.suite.registry import TransferContext, get_method


def test_config_defaults_and_validation():
    cfg = SeekingConfig()
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.schedule, cfg.lora_r, cfg.lora_alpha) == (3, 3e-4, 64, "linear",
                                                                                              16, 16)
    assert {"embed_tokens", "lm_head", "gate_proj", "k_proj"} <= set(cfg.lora_targets)
    assert "sensitivity_device" not in cfg.fingerprint()
    for bad in ({"trainable": "full"}, {"seed_split": "test"}, {"lora_targets": []}, {"sensitivity_device": "gpu7"},
                {"epochs": 0}):
        with pytest.raises((ValueError, RuntimeError)):
            SeekingConfig(**bad)


class Toy(nn.Module):
    """loss = Σ_l w_l · x_l + head · x_0: ∂loss/∂w_l = x_l, so S_l = Σ_examples |w_l ⊙ x_l| by hand."""

    def __init__(self, w: torch.Tensor, head: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w.shape[1], 1, bias=False) for _ in w)
        self.head = nn.Linear(w.shape[1], 1, bias=False)
        with torch.no_grad():
            for lin, row in zip(self.layers, w):
                lin.weight.copy_(row)
            self.head.weight.copy_(head)


def toy_loss(model: Toy, b: dict[str, torch.Tensor]) -> torch.Tensor:
    x = b["x"][0]  # [L, d]
    return sum(lin(x[l]).sum() for l, lin in enumerate(model.layers)) + model.head(x[0]).sum()


def test_sensitivity_matches_hand_sums_and_ranks_layers():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.1, 0.1], [3.0, 1.0, -1.0]])
    x = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [1.0, -1.0, 2.0]],
                      [[-1.0, 2.0, 0.0], [-1.0, 0.0, 1.0], [-2.0, 1.0, 1.0]]])  # [N, L, d]; signs differ per example
    head = torch.tensor([[2.0, 0.0, -1.0]])
    model = Toy(w, head)
    S = sensitivity(model, {"x": x}, loss_fn=toy_loss)
    for l in range(3):
        expected = (w[l] * x[:, l]).abs().sum(0)  # per-example |θ·g|, then summed
        assert torch.allclose(S[f"layers.{l}.weight"][0], expected)
    assert torch.allclose(S["head.weight"][0], (head[0] * x[:, 0]).abs().sum(0))
    assert not torch.allclose(S["layers.0.weight"][0], (w[0] * x[:, 0]).sum(0).abs())  # abs before the sum matters
    assert all(p.grad is None for p in model.parameters())  # every gradient freed by the hooks
    scores = layer_scores(S, 3)
    assert torch.allclose(scores, torch.tensor([8.5, 0.8, 14.0], dtype=torch.float64))  # head not in any layer
    assert select_layers(scores, 2) == [0, 2]
    assert select_layers(scores, 1) == [2]
    with pytest.raises(ValueError, match="beyond"):
        layer_scores(S, 2)


def test_sensitivity_equals_naive_autograd_on_llama(tiny_pair, chat_records):
    model, tok = load_model(tiny_pair[0], dtype="float32")
    model.requires_grad_(True)
    data = tokenize_records(tok, chat_records[:3], max_len=48)
    S = sensitivity(model, data)
    naive = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(3):
        model.zero_grad(set_to_none=True)
        sft_loss(model, {k: v[i : i + 1] for k, v in data.items()}).backward()
        for n, p in model.named_parameters():
            naive[n] += (p * p.grad).abs()
    assert S.keys() == naive.keys() and "lm_head.weight" not in S  # tied head counted once, with the embedding
    for n in S:
        assert torch.allclose(S[n], naive[n], rtol=1e-4, atol=1e-9), n
    assert S["model.embed_tokens.weight"].sum() > 0
    model.zero_grad(set_to_none=True)
    sft_loss(model, {k: v[:1] for k, v in data.items()}).backward()
    assert model.lm_head.weight.grad is not None  # hooks removed afterwards


def test_select_layers_ties_and_depth_error():
    assert select_layers(torch.tensor([1.0, 5.0, 3.0, 5.0]), 2) == [1, 3]
    assert select_layers(torch.tensor([2.0, 2.0, 2.0]), 2) == [0, 1]  # ties: lower index first
    with pytest.raises(ValueError, match="fewer layers"):
        select_layers(torch.zeros(2), 3)


def brute_force(S: torch.Tensor, h: int, w: int) -> tuple[int, int]:
    best, where = None, None
    for i in range(S.shape[0] - h + 1):
        for j in range(S.shape[1] - w + 1):
            total = S[i : i + h, j : j + w].double().sum().item()
            if best is None or total > best:  # strict: the first maximum in row-major order wins
                best, where = total, (i, j)
    return where


@pytest.mark.parametrize("n,m,h,w", [(5, 7, 2, 3), (6, 4, 6, 1), (3, 8, 2, 8), (4, 4, 4, 4), (1, 5, 1, 2),
                                     (9, 6, 1, 1), (7, 7, 3, 5)])
def test_best_subblock_equals_brute_force(n, m, h, w):
    g = torch.Generator().manual_seed(n * 100 + m * 10 + h + w)
    for S in (torch.rand(n, m, generator=g), torch.randint(0, 2, (n, m), generator=g).float(), torch.ones(n, m)):
        assert best_subblock(S, h, w) == brute_force(S, h, w)
    assert best_subblock(torch.ones(n, m), h, w) == (0, 0)


def test_best_subblock_rejects_blocks_that_do_not_fit():
    for h, w in ((4, 2), (2, 5), (0, 1), (1, 0)):
        with pytest.raises(ValueError, match="does not fit"):
            best_subblock(torch.ones(3, 4), h, w)


def test_lora_factors_are_the_best_rank_r_approximation():
    M = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    A, B = lora_factors(M, 3)
    assert A.shape == (3, 7) and B.shape == (12, 3)
    s = torch.linalg.svdvals(M)
    assert torch.isclose(torch.linalg.norm(M - B @ A), s[3:].norm(), rtol=1e-4)  # Eckart-Young
    A7, B7 = lora_factors(M, 7)
    assert torch.allclose(B7 @ A7, M, atol=1e-5)
    with pytest.raises(ValueError, match="rank 8"):
        lora_factors(M, 8)


def test_injection_keeps_student_function_and_holds_teacher_factors(tiny_pair, chat_records):
    teacher, tok = load_model(tiny_pair[0])
    student, _ = load_model(tiny_pair[1])
    original = copy.deepcopy(student)
    g = torch.Generator().manual_seed(0)
    sens = {n: torch.rand(p.shape, generator=g) for n, p in teacher.named_parameters()}
    cfg = SeekingConfig(lora_r=4)
    selected = [1, 3]
    factors = extract_factors(teacher, student, sens, selected, cfg.lora_targets, cfg.lora_r)
    assert len(factors) == 2 * 7 + 2  # 7 projections per layer, embed_tokens, lm_head

    # the factors are those of the teacher's best block: student layer 1 (0-based) reads teacher layer 3
    t_w, t_s = teacher.model.layers[3].mlp.down_proj.weight, sens["model.layers.3.mlp.down_proj.weight"]
    i, j = best_subblock(t_s, 32, 64)
    A, B = lora_factors(t_w[i : i + 32, j : j + 64].detach(), 4)
    assert torch.allclose(factors["model.layers.1.mlp.down_proj"][0], A)
    assert torch.allclose(factors["model.layers.1.mlp.down_proj"][1], B)

    model = inject(student, factors, cfg).eval()
    ids = tokenize_records(tok, chat_records, max_len=48)
    with torch.no_grad():
        want = original(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        got = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert torch.allclose(got, want, atol=1e-5)

    base = model.base_model.model
    q = base.model.layers[1].self_attn.q_proj
    assert torch.equal(q.lora_A["default"].weight, factors["model.layers.1.self_attn.q_proj"][0])
    assert torch.equal(q.lora_B["default"].weight, factors["model.layers.1.self_attn.q_proj"][1])
    assert q.lora_A["default"].weight.abs().sum() > 0 and q.lora_B["default"].weight.abs().sum() > 0
    # the base holds the remainder W_s - s·BA
    assert not torch.allclose(q.base_layer.weight, original.model.layers[1].self_attn.q_proj.weight, atol=1e-3)
    emb = base.model.embed_tokens
    assert emb.lora_embedding_A["default"].shape == (4, teacher.config.vocab_size)
    assert emb.lora_embedding_B["default"].shape == (32, 4)
    assert base.lm_head.base_layer.weight is not emb.base_layer.weight  # tied student untied
    assert not base.config.tie_word_embeddings

    # merging the untrained adapters gives back the student's weights
    merged = model.merge_and_unload()
    for name, w in original.state_dict().items():
        assert torch.allclose(merged.state_dict()[name], w, atol=1e-5), name
    assert torch.allclose(merged.lm_head.weight, original.model.embed_tokens.weight, atol=1e-5)


def test_wider_student_or_missing_targets_are_errors():
    def llama(layers: int, hidden: int) -> LlamaForCausalLM:
        return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1))

    with pytest.raises(ValueError, match="smaller than student"):
        paired_modules(llama(3, 16), llama(2, 32), [0, 2], SeekingConfig().lora_targets)
    with pytest.raises(ValueError, match="no student module"):
        paired_modules(llama(3, 32), llama(2, 16), [0, 2], ["nonexistent_proj"])
    assert len(paired_modules(llama(3, 32), llama(2, 16), [0, 2], ["q_proj"])) == 2


def _ctx(teacher, student, tmp_path, chat_records, name="run"):
    splits = tmp_path / "splits"
    write_jsonl(splits / "extract.jsonl", chat_records[:3])
    write_jsonl(splits / "train.jsonl", chat_records)
    return TransferContext(teacher=teacher, student=student, splits=splits, task="gsm8k", out_dir=tmp_path / name,
                           seed=1, max_len=48,
                           params={"epochs": 1, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "lora_r": 4})


def test_run_end_to_end(tiny_pair, chat_records, tmp_path, monkeypatch):
    teacher_dir, student_dir = tiny_pair
    ctx = _ctx(teacher_dir, student_dir, tmp_path, chat_records)
    prepared = tmp_path / "prepare.pt"
    run_preparation("seeking", ctx, prepared)
    ctx.artifacts = {"preparation": prepared}

    def no_teacher(*args, **kwargs):
        raise AssertionError("sensitivity recomputed")

    with monkeypatch.context() as m:  # a transfer given the preparation never runs the teacher
        m.setattr(seeking, "sensitivity", no_teacher)
        out = get_method("seeking").run(ctx)

    stats = json.loads((ctx.out_dir / "train_stats.json").read_text())
    assert stats["teacher_forwards"] == 3
    assert len(stats["selected_layers"]) == 2 and stats["selected_layers"] == sorted(stats["selected_layers"])
    assert all(1 <= l <= 4 for l in stats["selected_layers"]) and len(stats["selected_scores"]) == 2
    assert stats["trainable_params"] > 0 and stats["config"]["lora_r"] == 4
    rows = list(csv.DictReader((ctx.out_dir / "layer_sensitivity.csv").open()))
    assert [int(r["teacher_layer"]) for r in rows] == [1, 2, 3, 4]
    picked = [int(r["teacher_layer"]) for r in rows if r["student_layer"]]
    assert picked == stats["selected_layers"]
    top = sorted(rows, key=lambda r: -float(r["score"]))[:2]
    assert sorted(int(r["teacher_layer"]) for r in top) == picked

    model, tok = load_model(out)
    student, _ = load_model(student_dir)
    assert model.config.num_hidden_layers == 2 and model.lm_head.weight.shape == student.lm_head.weight.shape
    ids = tokenize_records(tok, chat_records, max_len=48)
    with torch.no_grad():
        a = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        b = student(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert not torch.allclose(a, b, atol=1e-3)

    # saved = student - s·B0A0 (extracted) + s·BtAt (trained), s = alpha / r = 4
    (ckpt,) = (ctx.out_dir / "ckpt").glob("*/last.pt")
    trained = torch.load(ckpt, weights_only=False)["model"]
    extracted = torch.load(prepared, weights_only=True)["factors"]
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.default.weight"
    A0, B0 = extracted["model.layers.1.self_attn.q_proj"]
    want = student.model.layers[1].self_attn.q_proj.weight + 4 * (trained[key.format("B")] @ trained[key.format("A")]
                                                                  - B0 @ A0)
    assert torch.allclose(model.model.layers[1].self_attn.q_proj.weight, want, atol=1e-5)
    A0, B0 = extracted["model.embed_tokens"]
    At = trained["base_model.model.model.embed_tokens.lora_embedding_A.default"]
    Bt = trained["base_model.model.model.embed_tokens.lora_embedding_B.default"]
    want = student.model.embed_tokens.weight + 4 * (Bt @ At - B0 @ A0).T
    assert torch.allclose(model.model.embed_tokens.weight, want, atol=1e-5)
    assert not model.config.tie_word_embeddings
    assert not torch.allclose(model.lm_head.weight, model.model.embed_tokens.weight, atol=1e-4)  # trained apart

    # without the preparation file the run computes it itself (the cost benchmark's path): the very same model
    alone = get_method("seeking").run(_ctx(teacher_dir, student_dir, tmp_path, chat_records, name="alone"))
    assert (alone / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_preparation_reads_the_student_as_shapes_only(tiny_pair, chat_records, tmp_path, monkeypatch):
    """Regression: prepare loaded the whole student on the CPU for its shapes (a 7B student: 28 GB of host memory
    in fp32). It now reads a meta-device skeleton, and prepares exactly what it did with the loaded student."""
    teacher_dir, student_dir = tiny_pair
    ctx = _ctx(teacher_dir, student_dir, tmp_path, chat_records)
    method = get_method("seeking")
    cfg = method.config(ctx.params)
    with monkeypatch.context() as m:  # the student through the skeleton, as a rule runs it: never loaded
        def load(path, **kwargs):
            assert path != student_dir, "the student's weights were loaded"
            return load_model(path, **kwargs)

        m.setattr(seeking, "load_model", load)
        skeleton = method.prepare(ctx, cfg)
    with monkeypatch.context() as m:  # the same with the student's weights in memory
        m.setattr(seeking, "model_skeleton", lambda path: load_model(path, device="cpu")[0])
        loaded = method.prepare(ctx, cfg)
    assert (skeleton["scores"], skeleton["selected"], skeleton["n_seed"]) == \
        (loaded["scores"], loaded["selected"], loaded["n_seed"])
    assert list(skeleton["factors"]) == list(loaded["factors"]) and len(loaded["factors"]) == 16
    for name, (a, b) in loaded["factors"].items():
        assert torch.equal(skeleton["factors"][name][0], a) and torch.equal(skeleton["factors"][name][1], b), name


def test_run_refuses_a_deeper_student(tiny_pair, chat_records, tmp_path):
    teacher_dir, student_dir = tiny_pair
    ctx = _ctx(student_dir, teacher_dir, tmp_path, chat_records)  # 2-layer "teacher", 4-layer "student"
    with pytest.raises(ValueError, match="fewer layers"):
        get_method("seeking").run(ctx)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned, non-blocking host path needs a GPU"))])
def test_host_sums_equal_device_sums_exactly(tiny_pair_bf16, chat_records, device):
    """The default (sums on the host) gives the very sums of accumulating beside the parameters, on a bf16 teacher
    kept in its dtype. With a GPU this goes through the pinned staging slots (more parameters than slots, so
    slots are drained and reused); on a CPU-only machine both sums live on the host."""
    model, tok = load_model(tiny_pair_bf16[0], device=device)
    assert model.dtype == torch.bfloat16
    model.requires_grad_(True)
    data = tokenize_records(tok, chat_records[:3], max_len=48)
    host = sensitivity(model, data, device=SeekingConfig().sensitivity_device)
    beside = sensitivity(model, data, device=None)
    assert host.keys() == beside.keys()
    for n in host:
        assert host[n].device.type == "cpu" and host[n].dtype == torch.float32
        assert beside[n].device.type == device
        assert torch.equal(host[n], beside[n].cpu()), n
    assert sum(float(s.sum()) for s in host.values()) > 0


def test_sensitivity_memory_of_a_13b_teacher():
    """The docstring's arithmetic for Llama-2-13B at seq 768 (hand values): as written it did not fit an 80 GB
    GPU; bf16 teacher + host sums does, with the 52 GB of sums on the host."""
    shape = dict(n_params=13.0e9, largest_param=32000 * 5120, n_layers=40, hidden=5120, intermediate=13824,
                 vocab=32000, seq_len=768)
    acts_bf16 = 40 * 768 * (36 * 5120 + 8 * 13824) + 768 * 32000 * 10  # 9.06e9 + 0.25e9
    old = seeking.sensitivity_memory(param_bytes=4, sums_on_device=True, **shape)
    assert old["device"] == pytest.approx(52.0e9 + 52.0e9 + 2 * 9.06e9 + 0.25e9 + 1.64e8 * 12, rel=1e-3)
    beside = seeking.sensitivity_memory(param_bytes=2, sums_on_device=True, **shape)
    host = seeking.sensitivity_memory(param_bytes=2, sums_on_device=False, **shape)
    assert host["device"] == pytest.approx(26.0e9 + acts_bf16 + 1.64e8 * 10, rel=1e-3)
    assert host["host"] == 52.0e9 and beside["device"] == host["device"] + 52.0e9
    assert old["device"] > 80e9 and beside["device"] > 80e9 > host["device"]
