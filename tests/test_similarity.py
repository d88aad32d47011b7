"""Linear CKA and layer representations: the invariances CKA is chosen for, shapes, padding, and the csv round
trip the pairing rule and the CKA figure read."""
import numpy as np
import pytest
import torch

from semalign.pairing import pair_layers
from semalign.similarity import cka_matrix, cka_report, layer_representations, linear_cka, read_cka, token_positions
from semalign.suite.chat import tokenize_records
from semalign.suite.models import load_model


def test_linear_cka_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0)  # orthogonal, isotropic scale and shift
    assert linear_cka(x, rng.normal(size=(50, 5))) < 0.4
    assert linear_cka(x, np.ones((50, 3))) == 0.0  # a constant layer carries no similarity (no division by 0)
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, x[:10])


def _cka_by_definition(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.mark.parametrize("n", [200, 6])  # more tokens than width (cross products), fewer (Gram matrices)
def test_cka_matrix_equals_the_definition_in_both_forms(n):
    rng = np.random.default_rng(2)
    a = [rng.normal(size=(n, d)) for d in (8, 12)]
    b = [a[0] @ rng.normal(size=(8, 10)), rng.normal(size=(n, 9))]
    expected = [[_cka_by_definition(x, y) for y in b] for x in a]
    np.testing.assert_allclose(cka_matrix(a, b), expected, rtol=1e-10)


def test_cka_matrix_shape_and_self_symmetry():
    rng = np.random.default_rng(1)
    a = [rng.normal(size=(40, d)) for d in (4, 6, 8)]
    b = [rng.normal(size=(40, d)) for d in (5, 7)]
    m = cka_matrix(a, b)
    assert m.shape == (3, 2) and ((0 <= m) & (m <= 1)).all()
    assert m[1, 0] == pytest.approx(linear_cka(a[1], b[0]))
    self_sim = cka_matrix(a, a)
    np.testing.assert_allclose(self_sim, self_sim.T)
    np.testing.assert_allclose(np.diag(self_sim), 1.0)


def test_token_positions_subsample_is_seeded_and_skips_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.equal(token_positions(mask), mask.bool())
    sub = token_positions(mask, max_tokens=3, seed=5)
    assert int(sub.sum()) == 3 and not (sub & ~mask.bool()).any()
    assert torch.equal(sub, token_positions(mask, max_tokens=3, seed=5))


def test_layer_representations_tiny_llama(tiny_pair, chat_records):
    teacher_dir, _ = tiny_pair
    model, tok = load_model(teacher_dir, device="cpu")
    batch = tokenize_records(tok, chat_records, max_len=64)
    real = token_positions(batch["attention_mask"])
    reps = layer_representations(model, batch, real, batch_size=4)  # 2 forward batches: 4 + 2 rows
    n_real = int(batch["attention_mask"].sum())
    assert n_real < batch["attention_mask"].numel()  # the batch has padding, and it is excluded
    assert len(reps) == 4 and all(r.shape == (n_real, 64) and r.dtype == np.float32 for r in reps)
    sub = layer_representations(model, batch, token_positions(batch["attention_mask"], max_tokens=10), batch_size=4)
    assert all(r.shape == (10, 64) for r in sub)
    # a token's state does not depend on the batch it was in, nor on right padding (causal attention)
    alone = layer_representations(model, {k: v[:1] for k, v in batch.items()}, real[:1])
    np.testing.assert_allclose(alone[2], reps[2][: int(real[0].sum())], atol=1e-5)


def test_cka_report_feeds_the_cka_pairing(tiny_pair, chat_records, tmp_path):
    teacher_dir, student_dir = tiny_pair
    out = tmp_path / "none.csv"
    matrices = cka_report(teacher_dir, student_dir, chat_records, 64, out, max_tokens=50, device="cpu")
    back = read_cka(out)
    assert back["teacher_student"].shape == (2, 4) and back["student_self"].shape == (2, 2)
    for name in ("teacher_student", "student_self"):
        np.testing.assert_allclose(back[name], matrices[name], rtol=1e-6)
    np.testing.assert_allclose(np.diag(back["student_self"]), 1.0, rtol=1e-6)
    pairing = pair_layers(4, 2, "cka", cka=back["teacher_student"])
    assert [p["student"] for p in pairing["pairs"]] == [1, 2]


def test_cka_pairing_by_hand():
    # 2 student x 4 teacher layers; the row maxima (teacher 3, then 2) would break depth order. Monotone paths:
    # (3, 3) = 0.9 + 0.4 = 1.3 beats (3, 4) = 1.2, (2, 2) = 1.1 and (1, 2) = 1.0.
    cka = np.array([[0.2, 0.3, 0.9, 0.1],
                    [0.1, 0.8, 0.4, 0.3]])
    assert [p["teacher"] for p in pair_layers(4, 2, "cka", cka=cka)["pairs"]] == [[[3, 1.0]], [[3, 1.0]]]
