"""Semantic bases: analytic pinv/M on hand-built heads, chunked map == naive per-token path, errors, Fig. 2."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from semalign.bases import (
    BasisShapeError,
    align,
    aligned_map,
    build_aligned_map,
    collect_layer_states,
    decomposition_check,
    decomposition_report,
    recomposition_cosine,
    semantic_bases,
    write_decomposition,
)
from semalign.suite.models import VocabularyMismatchError


def tiny_llama(seed: int, layers: int = 2, hidden: int = 16, vocab: int = 97, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=2 * hidden, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def test_hand_built_heads_give_known_bases_and_map():
    # Teacher head 2*I (V = d_T = 4): pinv = I/2 -> unit columns = I.
    w_t = 2 * torch.eye(4)
    # Student head rows e1, e2, e1, e2 (V=4, d_S=2): W^T W = 2I, pinv = W^T / 2 -> unit columns e1, e2, e1, e2.
    w_s = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]])
    assert torch.allclose(semantic_bases(w_t), torch.eye(4, dtype=torch.float64))
    s_s = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float64)
    assert torch.allclose(semantic_bases(w_s), s_s)
    m = aligned_map(w_s, w_t, chunk_size=3)  # chunk not dividing V
    assert m.shape == (2, 4)
    assert torch.allclose(m, s_s.float())
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expect = torch.tensor([4.0, 6.0]) / torch.tensor(30.0).sqrt()  # (h1 + h3, h2 + h4) / ||h||
    assert torch.allclose(align(h, m), expect, atol=1e-6)
    assert torch.allclose(align(h, m, normalize=False), torch.tensor([4.0, 6.0]))


def test_orthonormal_head_bases_are_its_rows():
    q, _ = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64))  # W with orthonormal columns: pinv = W^T
    expect = q.T / q.T.norm(dim=0, keepdim=True)
    assert torch.allclose(semantic_bases(q), expect, atol=1e-10)


def test_chunked_map_equals_naive_per_token_path():
    torch.manual_seed(0)
    w_t, w_s = torch.randn(97, 12), torch.randn(97, 8)
    h = torch.randn(3, 5, 12)
    # naive: dense pinvs, V-dim cosine coefficients per token, recompose
    s_t = torch.linalg.pinv(w_t.double())
    s_t = s_t / s_t.norm(dim=0, keepdim=True)
    s_s = torch.linalg.pinv(w_s.double())
    s_s = s_s / s_s.norm(dim=0, keepdim=True)
    coeff = (h.double() @ s_t) / h.double().norm(dim=-1, keepdim=True)  # [3, 5, V]
    naive = coeff @ s_s.T
    for chunk in (7, 97, 4096):
        assert torch.allclose(align(h, aligned_map(w_s, w_t, chunk_size=chunk)).double(), naive, atol=1e-5)


def test_vocab_mismatch_is_a_clear_error():
    with pytest.raises(VocabularyMismatchError, match="vocabular"):
        aligned_map(torch.randn(97, 8), torch.randn(98, 12))
    assert issubclass(BasisShapeError, VocabularyMismatchError)


def test_recomposition_cosine_bounds_and_identity():
    h = torch.randn(10, 6)
    assert torch.allclose(recomposition_cosine(h, torch.eye(6)), torch.ones(10, dtype=torch.float64))
    # S S^T is PSD, so the Fig. 2 cosine is never negative, whatever the bases.
    assert (recomposition_cosine(h, torch.randn(6, 40)) >= -1e-12).all()


@pytest.mark.parametrize("tied", [False, True])
def test_decomposition_check_per_layer(tmp_path, tied):
    model = tiny_llama(0, layers=3, tied=tied)
    batch = {"input_ids": torch.randint(0, 97, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    states = collect_layer_states(model, batch, [0, 1, 2, 3])
    assert states[2].shape == (11, 16)
    results = {b: decomposition_check(model, states, b, seed=1) for b in ("output", "input", "random")}
    for per_layer in results.values():
        assert sorted(per_layer) == [0, 1, 2, 3]
        assert all(-1e-9 <= v <= 1 + 1e-9 for v in per_layer.values())
    # Output-side bases with V >> d: pinv(W) columns span R^d, S S^T is a well-conditioned PSD map.
    assert min(results["output"].values()) > 0.5
    assert decomposition_check(model, states, "random", seed=1) == results["random"]  # seeded
    write_decomposition(results, tmp_path / "fig2.csv", tmp_path / "fig2.png", title="tiny")
    assert (tmp_path / "fig2.csv").read_text().count("\n") == 1 + 3 * 4
    assert (tmp_path / "fig2.png").stat().st_size > 0 and (tmp_path / "fig2.pdf").exists()  # figures: png + pdf
    with pytest.raises(ValueError, match="basis must be"):
        decomposition_check(model, states, "bogus")


def test_rule_helpers_on_a_prepared_pair(tiny_pair, chat_records, tmp_path):
    teacher, student = tiny_pair
    stats = build_aligned_map(teacher, student, tmp_path / "map.pt", device="cpu")
    m = torch.load(tmp_path / "map.pt")
    assert m.shape == (32, 64) and (stats["d_student"], stats["d_teacher"]) == (32, 64) and stats["student_tied"]
    res = decomposition_report(student, chat_records, 48, tmp_path / "d.csv", tmp_path / "d.png")
    assert set(res) == {"output", "input", "random"} and sorted(res["output"]) == [0, 1, 2]
