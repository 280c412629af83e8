"""TRPO's trust-region math (rlft.trust_region) against closed forms: CG, the natural gradient of softmax and
Bernoulli policies, the step scaled to the KL radius, and the backtracking line search."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.trust_region import backtracking_line_search, conjugate_gradient, trust_region_step


def test_cg_solves_a_random_spd_system():
    generator = torch.Generator().manual_seed(0)
    n = 20
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    spd = a @ a.T + n * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    x = conjugate_gradient(lambda v: spd @ v, b, iterations=n, residual_tol=1e-20)  # default stops at |r| = 1e-5
    torch.testing.assert_close(spd @ x, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(x, torch.linalg.solve(spd, b), atol=1e-6, rtol=0)


def test_cg_on_a_closed_form_quadratic():
    # minimiser of 1/2 x^T A x - b^T x with A = diag(1, 2, 4): x = (b1, b2 / 2, b3 / 4); 3 iterations are exact
    a = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.tensor([1.0, -2.0, 8.0], dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=3)
    torch.testing.assert_close(x, torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    # a zero right-hand side stops at once with x = 0 (no product is taken)
    calls = []
    assert torch.equal(conjugate_gradient(lambda v: calls.append(v) or a @ v, torch.zeros(3)), torch.zeros(3))
    assert not calls


def _kl_fvp(logits_of, theta: torch.Tensor, damping: float = 0.0):
    """``v -> H v`` for H the Hessian of KL(pi_theta0 || pi_theta) at theta0, by double backward (as TRPO does)."""
    theta = theta.detach().clone().requires_grad_(True)
    logp = logits_of(theta).log_softmax(-1)
    old = logp.detach()
    kl = (old.exp() * (old - logp)).sum()
    (grad,) = torch.autograd.grad(kl, theta, create_graph=True)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        (hv,) = torch.autograd.grad(grad @ v, theta, retain_graph=True)
        return hv + damping * v

    return fvp


def test_natural_gradient_of_a_softmax_policy_is_the_centred_reward():
    # pi = softmax(theta) over K actions, J = sum_a pi_a r_a: g = (diag(p) - p p^T) r = F r, so the natural
    # gradient (the minimum-norm solution of F x = g; F is singular along the all-ones vector) is r - mean(r)
    theta = torch.tensor([0.3, -1.0, 0.5, 2.0], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, -2.0, 0.5], dtype=torch.float64)
    p = theta.softmax(-1)
    fisher = torch.diag(p) - torch.outer(p, p)
    fvp = _kl_fvp(lambda t: t, theta)
    v = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(fvp(v), fisher @ v)  # the Hessian of the KL at theta0 is the Fisher
    g = fisher @ r
    natural = conjugate_gradient(fvp, g, iterations=4)
    torch.testing.assert_close(natural, r - r.mean(), atol=1e-8, rtol=0)


def test_natural_gradient_of_a_bernoulli_policy():
    # one logit, pi(1) = sigmoid(theta): F = p (1 - p), J = p r1 + (1 - p) r0, g = p (1 - p)(r1 - r0), F^-1 g = r1 - r0
    theta = torch.tensor([0.7], dtype=torch.float64)
    fvp = _kl_fvp(lambda t: torch.cat([torch.zeros(1, dtype=t.dtype), t]), theta)
    p = torch.sigmoid(theta)
    torch.testing.assert_close(fvp(torch.ones(1, dtype=torch.float64)), p * (1 - p))
    g = p * (1 - p) * (2.0 - (-1.0))
    torch.testing.assert_close(conjugate_gradient(fvp, g, iterations=1), torch.tensor([3.0], dtype=torch.float64))


def test_trust_region_step_meets_the_quadratic_kl_at_the_radius():
    fisher = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    direction = torch.tensor([1.0, -3.0], dtype=torch.float64)
    step = trust_region_step(direction, lambda v: fisher @ v, max_kl=0.01)
    assert 0.5 * step @ fisher @ step == pytest.approx(0.01)
    torch.testing.assert_close(step / step.norm(), direction / direction.norm())
    expected_scale = math.sqrt(2 * 0.01 / float(direction @ fisher @ direction))
    torch.testing.assert_close(step, expected_scale * direction)
    # no curvature along the direction: no step
    assert torch.equal(trust_region_step(direction, lambda v: torch.zeros_like(v), 0.01), torch.zeros(2))


def _quadratic_problem(max_kl_scale: float = 1.0):
    """A concave quadratic surrogate L(x) = b^T x - 1/2 x^T A x from 0 and the Newton step s = A^-1 b, whose
    first-order improvement is exactly g^T s = b^T A^-1 b; the 'KL' is 1/2 (f s)^T A (f s)."""
    a = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    step = torch.linalg.solve(a, b)
    fractions = []

    def evaluate(fraction: float) -> tuple[float, float]:
        fractions.append(fraction)
        x = fraction * step
        return float(b @ x - 0.5 * x @ a @ x), float(0.5 * x @ a @ x) * max_kl_scale

    return evaluate, step, float(b @ step), fractions


def test_line_search_accepts_the_full_step_on_a_concave_quadratic():
    evaluate, step, expected, fractions = _quadratic_problem()
    fraction, info = backtracking_line_search(evaluate, step, expected, max_kl=1.0)
    assert fraction == 1.0 and fractions == [1.0]
    # the true improvement of the Newton step is half the linear prediction (ratio 0.5 >= 0.1)
    assert info["actual_improvement"] == pytest.approx(0.5 * expected)
    assert info["expected_improvement"] == pytest.approx(expected) and info["kl"] == pytest.approx(0.5 * expected)


def test_line_search_backtracks_until_the_kl_is_within_the_bound():
    evaluate, step, expected, fractions = _quadratic_problem()
    full_kl = 0.5 * expected  # KL of the full step; a fraction f has f^2 times it
    fraction, info = backtracking_line_search(evaluate, step, expected, max_kl=full_kl / 10)
    assert fraction == 0.25 and fractions == [1.0, 0.5, 0.25]  # 1/16 of the full KL is the first within 1/10
    assert info["kl"] <= full_kl / 10 and info["backtracks"] == 3
    assert info["expected_improvement"] == pytest.approx(0.25 * expected)


def test_line_search_returns_zero_when_no_fraction_improves():
    fraction, info = backtracking_line_search(lambda f: (-f, 0.0), torch.ones(2), 1.0, max_backtracks=5, max_kl=0.1)
    assert fraction == 0.0 and info["fraction"] == 0.0 and info["backtracks"] == 5
    # an improvement below accept_ratio of the expected one is no step either
    fraction, _ = backtracking_line_search(lambda f: (0.01 * f, 0.0), torch.ones(2), 1.0, max_kl=0.1)
    assert fraction == 0.0
    # nor is a non-finite evaluation, nor a step the linear model expects to make things worse
    assert backtracking_line_search(lambda f: (math.nan, 0.0), torch.ones(2), 1.0, max_kl=0.1)[0] == 0.0
    assert backtracking_line_search(lambda f: (1.0, 0.0), torch.ones(2), -1.0, max_kl=0.1)[0] == 0.0
