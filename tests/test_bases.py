"""Semantic bases: analytic pinv/M on hand-built heads, chunked map == naive per-token path, errors, Fig. 2."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from semalign.bases import (
    BASES,
    BasisShapeError,
    align,
    aligned_map,
    bases_gram,
    basis_matrix,
    build_aligned_map,
    collect_layer_states,
    decomposition_check,
    decomposition_report,
    lens_weight,
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


def test_recomposition_cosine_pins_hand_values():
    h = torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.0, 2.0]])
    assert torch.allclose(recomposition_cosine(h, bases_gram(torch.eye(2))), torch.ones(3, dtype=torch.float64))
    # S = [e1, e2, (e1 + e2)/sqrt 2]: S S^T = [[1.5, .5], [.5, 1.5]], so S S^T (1, 0) = (1.5, .5) -> cos = 1.5/sqrt 2.5;
    # (1, -1) is an eigenvector (eigenvalue 1) -> cos 1; S S^T (0, 2) = (1, 3) -> cos = 3/sqrt 10.
    s = torch.tensor([[1.0, 0.0, 0.5**0.5], [0.0, 1.0, 0.5**0.5]])
    expect = torch.tensor([1.5 / 2.5**0.5, 1.0, 3 / 10**0.5], dtype=torch.float64)
    gram = bases_gram(s, chunk_size=2)  # a chunk not dividing V
    assert torch.allclose(gram, torch.tensor([[1.5, 0.5], [0.5, 1.5]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(recomposition_cosine(h, gram), expect, atol=1e-12)


def naive_fig2(bases: torch.Tensor, states: torch.Tensor) -> float:
    """Eq. 1-2 token by token: V cosine coefficients, recompose, cosine with the state; mean over tokens."""
    x = states.double()
    coeff = (x @ bases) / x.norm(dim=-1, keepdim=True)
    return torch.nn.functional.cosine_similarity(x, coeff @ bases.T, dim=-1).mean().item()


def unit_pinv(w: torch.Tensor) -> torch.Tensor:
    p = torch.linalg.pinv(w.double())
    return p / p.norm(dim=0, keepdim=True)


@pytest.mark.parametrize("tied", [False, True])
def test_decomposition_check_per_layer(tmp_path, tied):
    model = tiny_llama(0, layers=3, tied=tied)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.3, 3.0, 16))  # a non-trivial final-norm gain
    batch = {"input_ids": torch.randint(0, 97, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    states = collect_layer_states(model, batch, [0, 1, 2, 3])
    with torch.no_grad():
        hf = model(**batch, output_hidden_states=True).hidden_states  # HF's last entry is post-norm: compare 0..2
    real = batch["attention_mask"].bool()
    assert states[2].shape == (11, 16) and all(torch.equal(states[k], hf[k][real]) for k in range(3))
    results = {b: decomposition_check(model, states, b, seed=1) for b in BASES}
    w, gamma, emb = model.lm_head.weight.detach(), model.model.norm.weight.detach(), model.model.embed_tokens.weight
    naive = {"output": unit_pinv(w.double() * gamma.double()), "output_unfolded": unit_pinv(w),
             "input": emb.detach().double().T / emb.detach().double().norm(dim=1)}
    for basis, bases in naive.items():
        assert [results[basis][k] for k in range(4)] == pytest.approx([naive_fig2(bases, states[k]) for k in range(4)],
                                                                       rel=1e-9), basis
    assert results["output"] != pytest.approx(results["output_unfolded"], rel=1e-3)  # the gain changes Fig. 2
    assert decomposition_check(model, states, "random", seed=1) == results["random"]  # seeded
    assert decomposition_check(model, states, "random", seed=2) != results["random"]
    write_decomposition(results, tmp_path / "fig2.csv", tmp_path / "fig2.png", title="tiny")
    assert (tmp_path / "fig2.csv").read_text().count("\n") == 1 + len(BASES) * 4
    assert (tmp_path / "fig2.png").stat().st_size > 0 and (tmp_path / "fig2.pdf").exists()  # figures: png + pdf
    with pytest.raises(ValueError, match="basis must be"):
        decomposition_check(model, states, "bogus")


def test_decomposition_check_builds_the_gram_once_per_basis(monkeypatch):
    """Regression: S S^T (d² V multiply-adds) was rebuilt for every layer's states, 124 times for the SmolLM2
    teacher's 31 states x 4 bases: 114 of the semantic_bases job's 200 s on mini."""
    import semalign.bases as bases

    calls, real = [], bases.bases_gram
    monkeypatch.setattr(bases, "bases_gram", lambda s, *args: calls.append(s.shape) or real(s, *args))
    decomposition_check(tiny_llama(0, layers=3), {k: torch.randn(5, 16) for k in range(4)}, "output")
    assert calls == [(16, 97)]


def test_folded_bases_reproduce_the_logits_the_model_reads():
    model = tiny_llama(4, hidden=16)
    gamma = torch.linspace(-2.0, 3.0, 16)  # non-trivial, one sign change, no zero
    with torch.no_grad():
        model.model.norm.weight.copy_(gamma)
    w = model.lm_head.weight.detach().double()
    folded = basis_matrix(model, "output")
    unfolded = basis_matrix(model, "output_unfolded")

    def lens(x):  # the model's own read-out: head(norm(x))
        with torch.no_grad():
            return model.lm_head(model.model.norm(x.float())).double()

    # (1) basis i read through the model's lens points where W W^+ e_i does (the least-squares "logits = e_i"):
    # W diag(γ) pinv(W diag(γ)) = W W^+ (same column space); the unfolded bases miss it by γ.
    proj = w @ torch.linalg.pinv(w)  # [V, V], independent of the code's SVD path
    gain = gamma.double()
    assert torch.allclose(torch.nn.functional.cosine_similarity((w * gain) @ folded, proj, dim=0),
                          torch.ones(97, dtype=torch.float64), atol=1e-9)
    assert torch.nn.functional.cosine_similarity((w * gain) @ unfolded, proj, dim=0).min() < 0.99
    # (2) decompose h into the lens's coefficients (folded logits x the pinv column norms), recompose over the folded
    # bases: h comes back, so head(norm(.)) reproduces the logits exactly; the same with the unfolded bases does not.
    h = torch.randn(5, 16, dtype=torch.float64)
    norms = torch.linalg.pinv(w * gain).norm(dim=0)
    coeff = (h @ (w * gain).T) * norms
    assert torch.allclose(lens(coeff @ folded.T), lens(h), atol=1e-5)
    assert not torch.allclose(lens(coeff @ unfolded.T), lens(h), atol=1e-2)


def test_unit_gain_folding_is_a_no_op():
    model = tiny_llama(5)
    assert torch.equal(model.model.norm.weight, torch.ones(16))  # HF initialises RMSNorm's γ to 1
    assert torch.equal(lens_weight(model, fold=True), lens_weight(model, fold=False))
    assert torch.equal(basis_matrix(model, "output"), basis_matrix(model, "output_unfolded"))


def test_rule_helpers_on_a_prepared_pair(tiny_pair, chat_records, tmp_path):
    teacher, student = tiny_pair
    stats = build_aligned_map(teacher, student, tmp_path / "map.pt", device="cpu")
    m = torch.load(tmp_path / "map.pt")
    assert m.shape == (32, 64) and (stats["d_student"], stats["d_teacher"]) == (32, 64) and stats["student_tied"]
    assert stats["fold_final_norm"]
    # prepared random models keep γ = 1, so the folded map equals the unfolded one
    build_aligned_map(teacher, student, tmp_path / "unfolded.pt", device="cpu", fold=False)
    assert torch.equal(torch.load(tmp_path / "unfolded.pt"), m)
    res = decomposition_report(student, chat_records, 48, tmp_path / "d.csv", tmp_path / "d.png")
    assert list(res) == list(BASES) and sorted(res["output"]) == [0, 1, 2]
