"""Loss variants: zero at identity, hand-computed values, gradients (gradcheck / analytic), mask handling."""
import math

import pytest
import torch

from semalign.losses import (
    LOSSES,
    cosine_layer_loss,
    fisher_quadratic,
    hidden_mse_loss,
    layer_loss,
    onehot_cosine_loss,
    relation_loss,
    relation_matrices,
)
from semalign.suite.objectives import output_kl

D64 = torch.float64


def test_cosine_layer_loss_hand_value_and_mask():
    h = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, -3.0]]])
    t = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [-1.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # third token is padding: must not count
    # cos = 0 and 1/sqrt(2): loss = 1 - (0 + 0.7071) / 2
    assert cosine_layer_loss(h, t, mask).item() == pytest.approx(1 - 0.5 / math.sqrt(2), rel=1e-6)
    assert cosine_layer_loss(h, 7 * h, torch.ones(1, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_onehot_cosine_hand_value():
    z = torch.tensor([[[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 2]])
    # token 1: z_y / ||z|| = 4/5; token 2 masked
    assert onehot_cosine_loss(z, labels, torch.tensor([[1, 0]])).item() == pytest.approx(0.2, rel=1e-6)
    assert onehot_cosine_loss(z, torch.tensor([[1, 0]]), torch.ones(1, 2)).item() == pytest.approx(1 - 0.9, rel=1e-6)


def test_relation_loss_identity_invariances_and_two_token_case():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, dtype=D64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=D64))
    assert relation_loss(x, x, mask).item() == pytest.approx(0.0, abs=1e-12)
    # relational: invariant to orthogonal maps, scaling and a per-sequence shift, and to padding contents
    y = 3.0 * x @ q + torch.randn(2, 1, 4, dtype=D64)
    y[0, 4] = 1e3
    assert relation_loss(x, y, mask).item() == pytest.approx(0.0, abs=1e-10)
    # Two tokens: centring gives (+u, -u), so G = [[1, -1], [-1, 1]] for any distinct pair, and 0 if they coincide.
    same = torch.tensor([[[1.0, 2.0], [1.0, 2.0]]], dtype=D64)
    diff = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], dtype=D64)
    assert torch.allclose(relation_matrices(diff, torch.ones(1, 2)), torch.tensor([[[1.0, -1], [-1, 1]]], dtype=D64))
    # (G_x - G_y)^2 summed = 4 over n^2 = 4 pairs
    assert relation_loss(same, diff, torch.ones(1, 2)).item() == pytest.approx(1.0, rel=1e-6)


def test_relation_loss_three_token_hand_value():
    # x centred already: rows (1,0), (0,1), (-1,-1); cosines: G12 = 0, G13 = G23 = -1/sqrt(2)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]], dtype=D64)
    # y: rows (1,0), (-1,0), (0,0) -> centred identical, G = [[1,-1,0],[-1,1,0],[0,0,0]]
    y = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]], dtype=D64)
    s = 1 / math.sqrt(2)
    gx = torch.tensor([[1, 0, -s], [0, 1, -s], [-s, -s, 1]], dtype=D64)
    gy = torch.tensor([[1, -1, 0], [-1, 1, 0], [0, 0, 0]], dtype=D64)
    expect = ((gx - gy) ** 2).sum().item() / 9
    assert relation_loss(x, y, torch.ones(1, 3)).item() == pytest.approx(expect, rel=1e-6)


def test_relation_and_cosine_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, dtype=D64, requires_grad=True)
    y = torch.randn(2, 4, 3, dtype=D64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.autograd.gradcheck(lambda a: relation_loss(a, y, mask), (x,))
    assert torch.autograd.gradcheck(lambda a: cosine_layer_loss(a, y, mask), (x,))
    z = torch.randn(2, 4, 5, dtype=D64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4))
    assert torch.autograd.gradcheck(lambda a: onehot_cosine_loss(a, labels, mask), (z,))
    # padding positions receive no gradient
    relation_loss(x, y, mask).backward()
    assert x.grad[0, 3].abs().max() == 0 and x.grad[1, 2:].abs().max() == 0


def test_fisher_quadratic_hand_value_gradient_and_kl_expansion():
    # p = (0.5, 0.5), d = (1, 0): 0.5 * (0.5 - 0.25) = 0.125
    zt = torch.zeros(1, 1, 2)
    assert fisher_quadratic(torch.tensor([[[1.0, 0.0]]]), zt, torch.ones(1, 1)).item() == pytest.approx(0.125)
    torch.manual_seed(2)
    z_t = torch.randn(2, 3, 7, dtype=D64)
    z_s = torch.randn(2, 3, 7, dtype=D64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert fisher_quadratic(z_t, z_t, mask).item() == 0.0
    assert fisher_quadratic(z_s + 5.0, z_t, mask).item() == pytest.approx(fisher_quadratic(z_s, z_t, mask).item())
    fisher_quadratic(z_s, z_t, mask).double().backward()
    p = torch.softmax(z_t.float(), -1).double()
    d = z_s.detach().float().double() - z_t.float().double()
    analytic = (p * d - p * (p * d).sum(-1, keepdim=True)) * mask.unsqueeze(-1) / mask.sum()
    assert torch.allclose(z_s.grad, analytic, atol=1e-6)
    # second-order expansion of KL(p* || softmax(z* + d)) for small d
    small = z_t + 1e-2 * torch.randn_like(z_t)
    kl = output_kl(small, z_t, mask).item()
    assert fisher_quadratic(small, z_t, mask).item() == pytest.approx(kl, rel=5e-2)


def test_hidden_mse_and_dispatch():
    h = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    t = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]])
    assert hidden_mse_loss(h, t, torch.tensor([[1, 0]])).item() == pytest.approx(2.5)
    torch.manual_seed(3)
    s_logits, t_logits = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    out_mask = torch.tensor([[1, 1]])
    mask = torch.ones(1, 2)
    h = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    for name in LOSSES:
        terms = layer_loss(name, h, h, mask, s_logits, t_logits, labels=torch.tensor([[1, 2]]), out_mask=out_mask)
        assert terms.layer.item() == pytest.approx(0.0, abs=1e-6)
        if name != "v1":
            assert terms.output.item() == pytest.approx(output_kl(s_logits, t_logits, out_mask).item())
        assert layer_loss(name, h, h, mask).output.item() == 0.0  # stage without output term
    with pytest.raises(ValueError, match="unknown loss"):
        layer_loss("v3", h, h, mask)
