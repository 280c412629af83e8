"""Trust-region steps (TRPO, Schulman et al. 2015, https://arxiv.org/abs/1502.05477): pure tensor math.

TRPO maximises the importance-weighted surrogate under a bound on the mean KL to the policy that sampled the data
(eq. 14 of the paper)::

    maximise_theta  L(theta) = E[ pi_theta(a|s) / pi_old(a|s) * A(s, a) ]
    subject to      KL_mean(theta_old, theta) = E[ KL(pi_old(.|s) || pi_theta(.|s)) ] <= delta

Appendix C solves it approximately: the objective to first order (gradient ``g``), the constraint to second order
(``KL ~ 1/2 s^T F s`` with ``F`` the Fisher information, the Hessian of the mean KL at ``theta_old``). The search
direction is the natural gradient ``d = F^-1 g`` (:func:`conjugate_gradient`, from Fisher-vector products only),
scaled so the quadratic KL model equals ``delta`` (:func:`trust_region_step`), and the step is shrunk until the true
surrogate improves and the true KL is within ``delta`` (:func:`backtracking_line_search`).

Everything here works on flat 1-D vectors and callables; nothing knows about models.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def conjugate_gradient(
    fvp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    iterations: int = 10,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """Solve ``F x = b`` for a symmetric positive-definite ``F`` given only products ``v -> F v``.

    The conjugate-gradient method (Hestenes & Stiefel 1952) as TRPO uses it (Appendix C of
    https://arxiv.org/abs/1502.05477): starting at ``x_0 = 0``, ``r_0 = p_0 = b``,

    ``alpha_k = r_k^T r_k / p_k^T F p_k``, ``x_{k+1} = x_k + alpha_k p_k``, ``r_{k+1} = r_k - alpha_k F p_k``,
    ``beta_k = r_{k+1}^T r_{k+1} / r_k^T r_k``, ``p_{k+1} = r_{k+1} + beta_k p_k``;

    it stops after ``iterations`` products or once ``r^T r < residual_tol``. In exact arithmetic it solves an
    ``n``-dimensional system in ``n`` iterations; a few (TRPO: 10) give a good natural-gradient direction.

    Args:
        fvp: ``v -> F v`` for flat vectors shaped like ``b``.
        b: Right-hand side (TRPO: the surrogate's gradient ``g``).
        iterations: Most matrix-vector products.
        residual_tol: Stop once the squared residual norm is below this.

    Returns:
        ``x`` with ``F x ~ b``, shaped like ``b``.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = torch.dot(r, r)
    for _ in range(iterations):
        if rr <= residual_tol:
            break
        fp = fvp(p)
        curvature = torch.dot(p, fp)
        if curvature <= 0:  # F is not positive definite along p (or p is 0): no further progress is defined
            break
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * fp
        rr_next = torch.dot(r, r)
        p = r + (rr_next / rr) * p
        rr = rr_next
    return x


def trust_region_step(
    direction: torch.Tensor, fvp: Callable[[torch.Tensor], torch.Tensor], max_kl: float
) -> torch.Tensor:
    """The search direction scaled to the edge of the KL trust region.

    Under the quadratic model ``KL(theta_old, theta_old + s) ~ 1/2 s^T F s``, the largest step along ``d`` with
    ``KL <= delta`` is (Appendix C of https://arxiv.org/abs/1502.05477)

    ``s = sqrt(2 delta / (d^T F d)) * d``;

    for ``d = F^-1 g`` this is the natural-gradient step ``sqrt(2 delta / g^T F^-1 g) F^-1 g``.

    Args:
        direction: ``d`` (flat).
        fvp: ``v -> F v``.
        max_kl: ``delta``.

    Returns:
        The step ``s`` (zero when ``d^T F d`` is not positive: no curvature to bound the step by).
    """
    curvature = torch.dot(direction, fvp(direction))
    if not torch.isfinite(curvature) or curvature <= 0:
        return torch.zeros_like(direction)
    return torch.sqrt(2.0 * max_kl / curvature) * direction


def backtracking_line_search(
    evaluate: Callable[[float], tuple[float, float]],
    step: torch.Tensor,
    expected_improvement: float,
    *,
    max_backtracks: int = 10,
    accept_ratio: float = 0.1,
    shrink: float = 0.5,
    max_kl: float,
) -> tuple[float, dict[str, float]]:
    """The largest fraction ``shrink^k`` of ``step`` that improves the surrogate within the KL bound.

    TRPO's line search (Appendix C of https://arxiv.org/abs/1502.05477; ``linesearch`` of the authors' code): try
    ``theta_old + shrink^k s`` for ``k = 0, 1, ..., max_backtracks - 1`` and accept the first whose true
    improvement ``L(theta) - L(theta_old)`` is positive and at least ``accept_ratio`` times the improvement the
    linear model predicts for that fraction (``shrink^k * g^T s``), and whose true mean KL is ``<= max_kl``. When no
    fraction qualifies, no step is taken.

    Args:
        evaluate: ``fraction -> (surrogate improvement, mean KL)`` at ``theta_old + fraction * step``.
        step: The full step (only its use by ``evaluate`` matters here; kept for the record).
        expected_improvement: ``g^T s``, the first-order improvement of the full step.
        max_backtracks: Fractions to try.
        accept_ratio: Least ratio of actual to expected improvement.
        shrink: Factor between consecutive fractions.
        max_kl: ``delta``.

    Returns:
        ``(fraction, info)``: the accepted fraction, or ``0.0`` for no step; ``info`` holds ``fraction``,
        ``expected_improvement`` (of the accepted fraction, or the full step), ``actual_improvement`` and ``kl`` (of
        the accepted fraction, or of the last one tried), and ``backtracks`` (fractions tried).
    """
    del step  # evaluate applies it
    info = {
        "fraction": 0.0,
        "expected_improvement": float(expected_improvement),
        "actual_improvement": 0.0,
        "kl": 0.0,
        "backtracks": 0.0,
    }
    if not math.isfinite(expected_improvement) or expected_improvement <= 0:
        return 0.0, info
    fraction = 1.0
    for k in range(max_backtracks):
        improvement, kl = evaluate(fraction)
        improvement, kl = float(improvement), float(kl)
        expected = expected_improvement * fraction
        info.update(actual_improvement=improvement, kl=kl, backtracks=float(k + 1))
        finite = math.isfinite(improvement) and math.isfinite(kl)
        if finite and kl <= max_kl and improvement > 0 and improvement >= accept_ratio * expected:
            info.update(fraction=fraction, expected_improvement=expected)
            return fraction, info
        fraction *= shrink
    return 0.0, info
