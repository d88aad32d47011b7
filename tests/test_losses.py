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


def test_hidden_mse_is_per_token_relative():
    h = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    t = torch.tensor([[[0.0, 2.0], [9.0, 9.0]]])
    # token 1: ||(1, 0)||^2 / ||(0, 2)||^2 = 1/4; token 2 masked
    assert hidden_mse_loss(h, t, torch.tensor([[1, 0]])).item() == pytest.approx(0.25)
    # token 2 alone: ||(-9, -9)||^2 / 162 = 1
    assert hidden_mse_loss(h, t, torch.tensor([[0, 1]])).item() == pytest.approx(1.0)


def test_hidden_mse_not_dominated_by_one_giant_token():
    """Regression (attention sink, ||h|| ~ 2.5e4 on SmolLM2): the plain MSE was carried by the huge token. A 1%
    error on a 1000-norm token and a total miss on a unit token: the miss is what the loss must see."""
    h = torch.tensor([[[1010.0, 0.0], [0.0, 1.0]]], requires_grad=True)
    t = torch.tensor([[[1000.0, 0.0], [1.0, 0.0]]])
    loss = hidden_mse_loss(h, t, torch.ones(1, 2))
    # (100 / 1e6 + 2 / 1) / 2; the plain per-element MSE was (100/2 + 2/2) / 2 = 25.5, 98% from the giant token
    assert loss.item() == pytest.approx((1e-4 + 2.0) / 2, rel=1e-6)
    loss.backward()
    # d/dh of (||h-t||^2/||t||^2)/2: (h - t) / ||t||^2 -> (10/1e6, 0) and (-1, 1)
    assert torch.allclose(h.grad, torch.tensor([[[1e-5, 0.0], [-1.0, 1.0]]]), rtol=1e-5, atol=1e-9)


def test_output_kl_hand_value_direction_and_temperature():
    # teacher p = (1/4, 3/4), student q = (1/2, 1/2): KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2); the reverse
    # KL(q || p) = 1/2 ln 2 + 1/2 ln(2/3) = 0.1438 differs
    t = torch.tensor([[[0.0, math.log(3.0)]]])
    s = torch.zeros(1, 1, 2)
    one = torch.ones(1, 1)
    forward = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert output_kl(s, t, one).item() == pytest.approx(forward, rel=1e-6)
    assert output_kl(s, t, one).item() != pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-3)
    # T^2 * KL(softmax(z_t / T) || softmax(z_s / T)): at T = 2 on doubled logits, exactly 4x the T = 1 value
    torch.manual_seed(4)
    zs, zt = torch.randn(2, 3, 6, dtype=D64), torch.randn(2, 3, 6, dtype=D64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert output_kl(2 * zs, 2 * zt, mask, temperature=2.0).item() == pytest.approx(
        4 * output_kl(zs, zt, mask).item(), rel=1e-9)
    # and by hand at T = 2 on the two-token case: p = softmax((0, ln 3) / 2) = (1, sqrt 3) / (1 + sqrt 3)
    p = torch.tensor([1.0, math.sqrt(3)], dtype=D64) / (1 + math.sqrt(3))
    assert output_kl(s, t, one, temperature=2.0).item() == pytest.approx(
        4 * (p * (p / 0.5).log()).sum().item(), rel=1e-6)
    # padding positions do not count: the mean is over the two real tokens only
    zs[0, 2] = 1e4
    assert output_kl(zs, zt, mask).item() == pytest.approx(
        sum(output_kl(zs[b:b + 1, i:i + 1], zt[b:b + 1, i:i + 1], one).item() for b, i in ((0, 0), (0, 1), (1, 0))) / 3)


def test_every_variant_dispatches_to_its_terms():
    """Each registered variant's layer term on a non-identity input, pinned by hand (a sign flip or a swapped
    function fails), zero at identity; its output term; no output term without logits."""
    r = 1 / math.sqrt(2)
    # v2: rows already centred; G_x has cosines 0 and -1/sqrt 2, y's rows are (1,0), (-1,0), (0,0)
    gx = torch.tensor([[1, 0, -r], [0, 1, -r], [-r, -r, 1]])
    gy = torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 0]])
    cases = {  # name: (student, target, hand value)
        "v1": ([[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [3.0, 0.0]], 1 - r / 2),  # cos = 0 and 1/sqrt 2
        "v2": ([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]],
               ((gx - gy) ** 2).sum().item() / 9),
        "acl": ([[1.0, 0.0]], [[0.0, 0.0]], 0.125),  # p = (1/2, 1/2), d = (1, 0): (1/2 - 1/4) / 2
        "hidden_mse": ([[1.0, 2.0]], [[0.0, 2.0]], 0.25),  # ||(1, 0)||^2 / ||(0, 2)||^2
        "kl_only": ([[1.0, 2.0]], [[0.0, 2.0]], 0.0),
    }
    assert set(cases) == set(LOSSES)
    torch.manual_seed(3)
    s_logits, t_logits = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    labels, out_mask = torch.tensor([[1, 2]]), torch.ones(1, 2)
    for name, (student, target, value) in cases.items():
        x, y = torch.tensor([student]), torch.tensor([target])
        mask = torch.ones(1, x.shape[1])
        terms = layer_loss(name, x, y, mask, s_logits, t_logits, labels=labels, out_mask=out_mask)
        assert terms.layer.item() == pytest.approx(value, rel=1e-5), name
        assert layer_loss(name, x, x, mask).layer.item() == pytest.approx(0.0, abs=1e-6)
        assert layer_loss(name, x, y, mask).output.item() == 0.0  # stage without output term
        out = onehot_cosine_loss(s_logits, labels, out_mask) if name == "v1" else output_kl(s_logits, t_logits, out_mask)
        assert terms.output.item() == pytest.approx(out.item()), name
    with pytest.raises(ValueError, match="unknown loss"):
        layer_loss("v3", x, x, mask)
