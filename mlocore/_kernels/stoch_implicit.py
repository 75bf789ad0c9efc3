"""Stochastic loops built on the implicit gradient with Neumann or CG inverses:
alternating (baseline), BSA, StocBiO, stochastic AID-BiO, TTSA and SOBA.

Signature and conventions: see :mod:`mlocore._kernels.stochastic`. Each iteration k is one
upper step; ``alpha_k`` (upper) and ``beta_k`` (lower) follow the schedules in ``fpar``.
"""
import numpy as np
from numba import njit

from .oracles import LOWER_GRAD, UPPER_GRAD
from .stochastic import upper_step as _upper_step
from .stochastic import (DIVERGED, ETA, OK, Q_TERMS, T_INNER, draw, finite, hypergrad_estimate,
                         inner_sgd, joint_into, lower_cross, sgrad, step_at, ALPHA0,
                         BETA0)


@njit(cache=True)
def run_alternating(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar,
                    samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """T lower SGD steps, then ``x <- P(x - alpha grad_x f(x, y; zeta))``: the implicit term
    is ignored (the baseline; biased unless grad_y f = 0 at the solution)."""
    dx = x.shape[0]
    z = np.empty(dx + y.shape[0])
    T = ipar[T_INNER]
    for it in range(n_iter):
        k = k0 + it
        inner_sgd(lfns, largs, z, x, y, dx, step_at(fpar, BETA0, k), T, samp_l, rng, counts)
        joint_into(z, x, y)
        idx, _ = draw(samp_u, rng)
        g = sgrad(ufns, uargs, z, idx, counts, UPPER_GRAD)
        _upper_step(x, g[:dx], step_at(fpar, ALPHA0, k), proj)
        if not (finite(x) and finite(y)):
            return DIVERGED, it
    return OK, n_iter


@njit(cache=True)
def _neumann_method(ufns, uargs, lfns, largs, has_lhvp, x, y, fpar, ipar, samp_u, samp_l, rng,
                    proj, k0, n_iter, counts, randomized):
    dx = x.shape[0]
    z = np.empty(dx + y.shape[0])
    T = ipar[T_INNER]
    Q = ipar[Q_TERMS]
    eta = fpar[ETA]
    for it in range(n_iter):
        k = k0 + it
        inner_sgd(lfns, largs, z, x, y, dx, step_at(fpar, BETA0, k), T, samp_l, rng, counts)
        joint_into(z, x, y)
        h = hypergrad_estimate(ufns, uargs, lfns, largs, has_lhvp, z, dx, eta, Q, samp_u,
                               samp_l, rng, counts, randomized)
        _upper_step(x, h, step_at(fpar, ALPHA0, k), proj)
        if not (finite(x) and finite(y)):
            return DIVERGED, it
    return OK, n_iter


@njit(cache=True)
def run_bsa(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar, samp_u,
            samp_l, rng, proj, k0, n_iter, counts):
    """BSA (Ghadimi & Wang 2018): T lower SGD steps, then a projected upper step along
    ``grad_x f - H_xy v`` with v from the randomized Neumann estimator
    (``eta Q prod_{j<=q}(I - eta H_j) grad_y f``, q uniform on {0..Q-1})."""
    return _neumann_method(ufns, uargs, lfns, largs, has_lhvp, x, y, fpar, ipar, samp_u,
                           samp_l, rng, proj, k0, n_iter, counts, True)


@njit(cache=True)
def run_stocbio(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar,
                samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """StocBiO (Ji, Yang & Liang 2021): T warm-started lower SGD steps, then the upper step
    with ``v = eta sum_{q<Q} prod_{j<=q} (I - eta H_j) grad_y f`` (Q - 1 HVPs)."""
    return _neumann_method(ufns, uargs, lfns, largs, has_lhvp, x, y, fpar, ipar, samp_u,
                           samp_l, rng, proj, k0, n_iter, counts, False)


@njit(cache=True)
def run_ttsa(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar, samp_u,
             samp_l, rng, proj, k0, n_iter, counts):
    """TTSA (Hong et al. 2023): one lower SGD step with ``beta_k``, then one projected upper
    step with ``alpha_k << beta_k`` along the randomized-Neumann hypergradient estimate
    (the default schedules are ``alpha ~ k^-3/5``, ``beta ~ k^-2/5``)."""
    return _neumann_method(ufns, uargs, lfns, largs, has_lhvp, x, y, fpar, ipar, samp_u,
                           samp_l, rng, proj, k0, n_iter, counts, True)


@njit(cache=True)
def run_aid(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar, samp_u,
            samp_l, rng, proj, k0, n_iter, counts):
    """Stochastic AID-BiO (Ji, Yang & Liang 2021): T lower SGD steps; v by Q conjugate-
    gradient iterations on ``H_yy(xi) v = grad_y f(zeta)`` for one lower minibatch xi (the
    operator must stay fixed during CG), warm-started from the previous v (``work[:dy]``);
    then the projected upper step along ``grad_x f - H_xy(xi) v``."""
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    T = ipar[T_INNER]
    Q = ipar[Q_TERMS]
    v = work[:dy]
    for it in range(n_iter):
        k = k0 + it
        inner_sgd(lfns, largs, z, x, y, dx, step_at(fpar, BETA0, k), T, samp_l, rng, counts)
        joint_into(z, x, y)
        idx_u, _ = draw(samp_u, rng)
        gf = sgrad(ufns, uargs, z, idx_u, counts, UPPER_GRAD)
        idx_l, _ = draw(samp_l, rng)
        # CG on the fixed minibatch Hessian, from the warm start
        _, hv = lower_cross(lfns, largs, has_lhvp, z, v, dx, idx_l, counts)
        r = gf[dx:] - hv
        p = r.copy()
        rr = r @ r
        for q in range(Q):
            if rr == 0.0:
                break
            _, hp = lower_cross(lfns, largs, has_lhvp, z, p, dx, idx_l, counts)
            php = p @ hp
            if not php > 0.0:
                break  # non-positive curvature on this batch: keep the current v
            a = rr / php
            v += a * p
            r -= a * hp
            rr_new = r @ r
            p = r + (rr_new / rr) * p
            rr = rr_new
        hx, _ = lower_cross(lfns, largs, has_lhvp, z, v, dx, idx_l, counts)
        _upper_step(x, gf[:dx] - hx, step_at(fpar, ALPHA0, k), proj)
        if not (finite(x) and finite(y) and finite(v)):
            return DIVERGED, it
    return OK, n_iter


@njit(cache=True)
def run_soba(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar, samp_u,
             samp_l, rng, proj, k0, n_iter, counts):
    """SOBA (Dagreou et al. 2022): joint single-loop steps on y, v and x::

        y <- y - rho_k grad_y g(xi)
        v <- v - rho_k (H_yy(xi) v - grad_y f(zeta))
        x <- P(x - gamma_k (grad_x f(zeta) - H_xy(xi) v))

    with ``rho = beta`` and ``gamma = alpha`` schedules and ``v = work[:dy]``
    (mlocore's sign convention: v tends to ``H_yy^{-1} grad_y f``)."""
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    v = work[:dy]
    for it in range(n_iter):
        k = k0 + it
        rho = step_at(fpar, BETA0, k)
        gamma = step_at(fpar, ALPHA0, k)
        joint_into(z, x, y)
        idx_l, _ = draw(samp_l, rng)
        idx_u, _ = draw(samp_u, rng)
        gg = sgrad(lfns, largs, z, idx_l, counts, LOWER_GRAD)
        hx, hy = lower_cross(lfns, largs, has_lhvp, z, v, dx, idx_l, counts)
        gf = sgrad(ufns, uargs, z, idx_u, counts, UPPER_GRAD)
        for i in range(dy):
            y[i] -= rho * gg[dx + i]
            v[i] -= rho * (hy[i] - gf[dx + i])
        _upper_step(x, gf[:dx] - hx, gamma, proj)
        if not (finite(x) and finite(y) and finite(v)):
            return DIVERGED, it
    return OK, n_iter
