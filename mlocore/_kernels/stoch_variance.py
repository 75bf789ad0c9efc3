"""Stochastic loops with variance reduction or corrected lower steps: STABLE, SUSTAIN / MRBO
(STORM double momentum) and VRBO (SPIDER/SARAH recursions with periodic large batches).

Signature and conventions: see :mod:`mlocore._kernels.stochastic`. Each iteration k is one
upper step; ``alpha_k`` (upper) and ``beta_k`` (lower) follow the schedules in ``fpar``.
All randomness comes from ``rng`` through the samplers and ``rand_int``, so a run is a
deterministic function of the seed and does not depend on how it is split into calls.

Method parameters (after the common ``N_FPAR`` / ``N_IPAR`` slots):

- STABLE: ``fpar = [..., tau, hessian_floor]``; ``work = [started, H_yy (dy*dy, row major),
  H_xy (dx*dy, row major)]``.
- SUSTAIN / MRBO: ``fpar = [..., momentum, inner_momentum]``, ``ipar = [..., randomized]``;
  ``work = [started, h_g (dy), h_f (dx), x_prev (dx), y_prev (dy)]``.
- VRBO: ``ipar = [..., period]``; ``work = [h_g (dy), h_f (dx), x_prev (dx), y_prev (dy)]``.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from .oracles import LOWER_GRAD, UPPER_GRAD
from .stochastic import upper_step as _upper_step
from .stochastic import (ALPHA0, BETA0, DIVERGED, ETA, N_FPAR, N_IPAR, OK, Q_TERMS, draw,
                         finite, joint_into, lower_cross, rand_int, sgrad, step_at)

# method parameter slots
STABLE_TAU, STABLE_FLOOR = N_FPAR, N_FPAR + 1
MOM_UPPER, MOM_LOWER = N_FPAR, N_FPAR + 1
MOM_RANDOMIZED = N_IPAR
VRBO_PERIOD = N_IPAR


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def _full_index(args, samp):
    pass


@overload(_full_index)
def _full_index_impl(args, samp):
    """The index array of the full batch: ``args[0]`` for a stochastic objective; for a
    deterministic one (``args[0] is None``, idx ignored) the sampler's one-sample array."""
    if isinstance(args.types[0], types.NoneType):
        return lambda args, samp: samp[1]
    return lambda args, samp: args[0]


@njit(cache=True)
def _steps_from_estimates(x, y, xp, yp, hg, hf, fpar, k, proj):
    """Remember (x, y) as the previous point, then ``y -= beta_k hg`` and
    ``x <- P(x - alpha_k hf)``; False when an iterate or estimate is non-finite."""
    xp[:] = x
    yp[:] = y
    beta = step_at(fpar, BETA0, k)
    for i in range(y.shape[0]):
        y[i] -= beta * hg[i]
    _upper_step(x, hf, step_at(fpar, ALPHA0, k), proj)
    return finite(x) and finite(y) and finite(hf) and finite(hg)


@njit(cache=True)
def _momentum_weight(fpar, base, slot, k):
    """``min(1, m * (s_k / s_0)**2)``: the STORM weight ``c * s_k**2`` with ``c = m / s_0**2``
    for the schedule at ``fpar[base:base+3]`` and ``m = fpar[slot]``."""
    r = step_at(fpar, base, k) / fpar[base]
    w = fpar[slot] * r * r
    return w if w < 1.0 else 1.0


@njit(cache=True)
def _neumann_pair(ufns, uargs, lfns, largs, has_lhvp, z1, z0, two, dx, eta, Q, randomized,
                  full, samp_u, samp_l, rng, counts):
    """Neumann hypergradient estimates ``grad_x f - H_xy v`` at ``z1`` and (if ``two``) at
    ``z0``, every minibatch drawn once and applied at both points.

    ``v`` approximates ``H_yy^{-1} grad_y f`` by ``eta sum_{q<Q} prod_{j<=q}(I - eta H_j)
    grad_y f`` (``randomized=False``, Q - 1 HVPs per point) or by ``eta Q prod_{j<=q}(I -
    eta H_j) grad_y f`` with q uniform on {0..Q-1} (``randomized=True``, the same q at both
    points). One upper batch for grad f, one lower batch per factor, one for ``H_xy``. With
    ``full`` every batch is the full sample set (nothing is drawn). Returns ``(h1, h0)``
    (``h0`` is ``h1`` when ``two`` is False)."""
    if full:
        idx_u = _full_index(uargs, samp_u)
    else:
        idx_u, _ = draw(samp_u, rng)
    gf1 = sgrad(ufns, uargs, z1, idx_u, counts, UPPER_GRAD)
    gf0 = sgrad(ufns, uargs, z0, idx_u, counts, UPPER_GRAD) if two else gf1
    p1 = gf1[dx:].copy()
    p0 = gf0[dx:].copy()
    s1 = p1.copy()
    s0 = p0.copy()
    nq = rand_int(rng, Q) if randomized else Q - 1
    for j in range(nq):
        if full:
            idx = _full_index(largs, samp_l)
        else:
            idx, _ = draw(samp_l, rng)
        _, hp1 = lower_cross(lfns, largs, has_lhvp, z1, p1, dx, idx, counts)
        p1 -= eta * hp1
        s1 += p1
        if two:
            _, hp0 = lower_cross(lfns, largs, has_lhvp, z0, p0, dx, idx, counts)
            p0 -= eta * hp0
            s0 += p0
    if randomized:
        v1 = (eta * Q) * p1
        v0 = (eta * Q) * p0
    else:
        v1 = eta * s1
        v0 = eta * s0
    if full:
        idx_l = _full_index(largs, samp_l)
    else:
        idx_l, _ = draw(samp_l, rng)
    hx1, _ = lower_cross(lfns, largs, has_lhvp, z1, v1, dx, idx_l, counts)
    h1 = gf1[:dx] - hx1
    if not two:
        return h1, h1
    hx0, _ = lower_cross(lfns, largs, has_lhvp, z0, v0, dx, idx_l, counts)
    return h1, gf0[:dx] - hx0


@njit(cache=True)
def _lower_grad_pair(lfns, largs, z1, z0, two, dx, idx, counts):
    """``grad_y g`` on batch idx at ``z1`` and (if ``two``) at ``z0``."""
    g1 = sgrad(lfns, largs, z1, idx, counts, LOWER_GRAD)[dx:].copy()
    if not two:
        return g1, g1
    g0 = sgrad(lfns, largs, z0, idx, counts, LOWER_GRAD)[dx:].copy()
    return g1, g0


# ---------------------------------------------------------------------------------------
# STABLE
# ---------------------------------------------------------------------------------------
@njit(cache=True)
def run_stable(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar, samp_u,
               samp_l, rng, proj, k0, n_iter, counts):
    """STABLE (Chen, Sun & Yin 2022): single-timescale steps with dense Hessian estimates.

    At ``z_k = (x_k, y_k)``::

        H^k    = (1 - tau) H^{k-1} + tau Hhat(z_k; phi_k)    (H^0 = Hhat(z_0; phi_0))
        H_yy^k <- projection of H_yy^k onto {H >= mu I}       (eigenvalue clipping)
        h_k    = grad_x f(z_k; zeta) - H_xy^k (H_yy^k)^{-1} grad_y f(z_k; zeta)
        x_{k+1} = P(x_k - alpha_k h_k)
        y_{k+1} = y_k - beta_k grad_y g(z_k; xi) - (H_yy^k)^{-1} H_yx^k (x_{k+1} - x_k)

    ``Hhat`` is built column by column from dy lower HVPs with directions ``(0, e_j)`` on
    one minibatch phi_k; ``H_yx = H_xy^T``. ``tau = fpar[N_FPAR]``, ``mu = fpar[N_FPAR+1]``.

    Notes
    -----
    The correction is the first-order change of the lower solution, ``dy* = -H_yy^{-1}
    H_yx dx``, and is not multiplied by beta (the lecture's Algorithm 6 writes it inside
    the beta bracket; Algorithm 5 and the paper do not scale it). The paper updates the
    Hessian estimates with a STORM-type correction ``(1 - tau)(H^{k-1} - Hhat(z_{k-1};
    phi_k)) + Hhat(z_k; phi_k)``; this is the plain moving average (the two coincide when
    the Hessians do not depend on z, e.g. on quadratics). Assumes a lower objective that is
    strongly convex in y near the iterates (the floor mu keeps the estimate invertible) and
    Lipschitz second derivatives. Cost per iteration: dy lower HVPs on one minibatch (so
    STABLE is meant for moderate dy), one lower and one upper minibatch gradient, one
    dy x dy symmetric eigendecomposition, O(dy^2 + dx dy) memory.
    """
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    tau = fpar[STABLE_TAU]
    mu = fpar[STABLE_FLOOR]
    Hyy = work[1:1 + dy * dy].reshape((dy, dy))
    Hxy = work[1 + dy * dy:1 + dy * dy + dx * dy].reshape((dx, dy))
    e = np.zeros(dy)
    hy_col = np.empty((dy, dy))
    hx_col = np.empty((dx, dy))
    xold = np.empty(dx)
    for it in range(n_iter):
        k = k0 + it
        joint_into(z, x, y)
        # minibatch Hessian blocks, one column per HVP
        idx_h, _ = draw(samp_l, rng)
        for j in range(dy):
            e[j] = 1.0
            hx, hy = lower_cross(lfns, largs, has_lhvp, z, e, dx, idx_h, counts)
            e[j] = 0.0
            hy_col[:, j] = hy
            hx_col[:, j] = hx
        if work[0] == 0.0:
            Hyy[:, :] = hy_col
            Hxy[:, :] = hx_col
            work[0] = 1.0
        else:
            for i in range(dy):
                for j in range(dy):
                    Hyy[i, j] = (1.0 - tau) * Hyy[i, j] + tau * hy_col[i, j]
            for i in range(dx):
                for j in range(dy):
                    Hxy[i, j] = (1.0 - tau) * Hxy[i, j] + tau * hx_col[i, j]
        # symmetrize and clip the spectrum of H_yy at mu
        S = 0.5 * (Hyy + Hyy.T)
        if not finite(S.ravel()):
            return DIVERGED, it
        lam, V = np.linalg.eigh(S)
        for i in range(dy):
            if lam[i] < mu:
                lam[i] = mu
        Hyy[:, :] = (V * lam) @ V.T
        # upper step
        idx_u, _ = draw(samp_u, rng)
        gf = sgrad(ufns, uargs, z, idx_u, counts, UPPER_GRAD)
        v = V @ ((V.T @ gf[dx:]) / lam)
        h = gf[:dx] - Hxy @ v
        xold[:] = x
        _upper_step(x, h, step_at(fpar, ALPHA0, k), proj)
        # lower step with the correction -(H_yy)^{-1} H_yx (x_{k+1} - x_k)
        idx_g, _ = draw(samp_l, rng)
        gg = sgrad(lfns, largs, z, idx_g, counts, LOWER_GRAD)
        c = V @ ((V.T @ (Hxy.T @ (x - xold))) / lam)
        beta = step_at(fpar, BETA0, k)
        for i in range(dy):
            y[i] -= beta * gg[dx + i] + c[i]
        if not (finite(x) and finite(y)):
            return DIVERGED, it
    return OK, n_iter


# ---------------------------------------------------------------------------------------
# SUSTAIN / MRBO (STORM double momentum)
# ---------------------------------------------------------------------------------------
@njit(cache=True)
def run_double_momentum(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar,
                        samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """STORM double momentum on both levels: SUSTAIN (Khanduri et al. 2021) and MRBO (Yang,
    Ji & Liang 2021) share this structure and differ in their schedules and constants (and
    in the Neumann estimator: randomized for SUSTAIN, summed for MRBO; ``ipar[N_IPAR]``)::

        h_g^k = grad_y g(z_k; xi_k) + (1 - eta_g^k) (h_g^{k-1} - grad_y g(z_{k-1}; xi_k))
        h_f^k = Fhat(z_k; B_k) + (1 - eta_f^k) (h_f^{k-1} - Fhat(z_{k-1}; B_k))
        y_{k+1} = y_k - beta_k h_g^k,    x_{k+1} = P(x_k - alpha_k h_f^k)

    ``Fhat`` is the Neumann hypergradient estimate, evaluated with the same minibatches (and
    the same random truncation) at both points. ``eta_f^k = min(1, m_f (alpha_k/alpha_0)^2)``,
    ``eta_g^k = min(1, m_g (beta_k/beta_0)^2)`` with ``(m_f, m_g) = fpar[N_FPAR:N_FPAR+2]``.
    At the first iteration (``work[0] == 0``) both are plain minibatch estimates.

    Notes
    -----
    Both papers use steps ``~ (w + k)^(-1/3)`` and momentum weights ``c * step_k^2`` and
    assume g strongly convex in y, f and g smooth with Lipschitz Hessians, and per-sample
    (mean-squared) Lipschitz oracles, which is what makes the same-batch differences small.
    Cost per iteration (after the first): 2 lower gradients, 2 upper gradients and, per
    point, the Neumann HVPs (Q - 1 for the sum, q < Q for the randomized estimator) plus one
    cross product ``H_xy v``: about 2 (Q + 1) lower HVPs with the sum.
    """
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    zp = np.empty(dx + dy)
    Q = ipar[Q_TERMS]
    randomized = ipar[MOM_RANDOMIZED] != 0
    eta = fpar[ETA]
    hg = work[1:1 + dy]
    hf = work[1 + dy:1 + dy + dx]
    xp = work[1 + dy + dx:1 + dy + 2 * dx]
    yp = work[1 + dy + 2 * dx:1 + 2 * dy + 2 * dx]
    for it in range(n_iter):
        k = k0 + it
        two = work[0] != 0.0
        joint_into(z, x, y)
        joint_into(zp, xp, yp)
        idx, _ = draw(samp_l, rng)
        g1, g0 = _lower_grad_pair(lfns, largs, z, zp, two, dx, idx, counts)
        f1, f0 = _neumann_pair(ufns, uargs, lfns, largs, has_lhvp, z, zp, two, dx, eta, Q,
                               randomized, False, samp_u, samp_l, rng, counts)
        if two:
            wg = 1.0 - _momentum_weight(fpar, BETA0, MOM_LOWER, k)
            wf = 1.0 - _momentum_weight(fpar, ALPHA0, MOM_UPPER, k)
            for i in range(dy):
                hg[i] = g1[i] + wg * (hg[i] - g0[i])
            for i in range(dx):
                hf[i] = f1[i] + wf * (hf[i] - f0[i])
        else:
            hg[:] = g1
            hf[:] = f1
            work[0] = 1.0
        if not _steps_from_estimates(x, y, xp, yp, hg, hf, fpar, k, proj):
            return DIVERGED, it
    return OK, n_iter


# ---------------------------------------------------------------------------------------
# VRBO (SPIDER / SARAH)
# ---------------------------------------------------------------------------------------
@njit(cache=True)
def run_vrbo(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar, samp_u,
             samp_l, rng, proj, k0, n_iter, counts):
    """VRBO (Yang, Ji & Liang 2021) with one lower step per upper step::

        if k % period == 0:  h_g = grad_y g(z_k; full),  h_f = Fhat(z_k; full batches)
        else:                h_g += grad_y g(z_k; B) - grad_y g(z_{k-1}; B)
                             h_f += Fhat(z_k; B) - Fhat(z_{k-1}; B)   (same batches)
        y_{k+1} = y_k - beta_k h_g,    x_{k+1} = P(x_k - alpha_k h_f)

    ``Fhat`` is the summed Neumann hypergradient estimate (Q terms); ``period =
    ipar[N_IPAR]``. The paper runs m lower steps (each with its own recursive update) per
    upper step; this is the m = 1 simplification.

    Notes
    -----
    Assumes g strongly convex in y, smooth f and g with Lipschitz Hessians and mean-squared
    Lipschitz per-sample oracles. Between refreshes the estimates are biased only by the
    Neumann truncation, so with constant steps the iterates converge to the fixed point of
    the truncated hypergradient (not a noise ball). Cost: a refresh is one full-batch lower
    gradient, one full-batch upper gradient and Q full-batch lower HVPs; a recursive
    iteration is 2 lower and 2 upper minibatch gradients and 2 Q lower minibatch HVPs.
    """
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    zp = np.empty(dx + dy)
    Q = ipar[Q_TERMS]
    period = ipar[VRBO_PERIOD]
    eta = fpar[ETA]
    hg = work[0:dy]
    hf = work[dy:dy + dx]
    xp = work[dy + dx:dy + 2 * dx]
    yp = work[dy + 2 * dx:2 * dy + 2 * dx]
    for it in range(n_iter):
        k = k0 + it
        joint_into(z, x, y)
        if k % period == 0:
            idx = _full_index(largs, samp_l)
            g1, _ = _lower_grad_pair(lfns, largs, z, z, False, dx, idx, counts)
            f1, _ = _neumann_pair(ufns, uargs, lfns, largs, has_lhvp, z, z, False, dx, eta,
                                  Q, False, True, samp_u, samp_l, rng, counts)
            hg[:] = g1
            hf[:] = f1
        else:
            joint_into(zp, xp, yp)
            idx, _ = draw(samp_l, rng)
            g1, g0 = _lower_grad_pair(lfns, largs, z, zp, True, dx, idx, counts)
            f1, f0 = _neumann_pair(ufns, uargs, lfns, largs, has_lhvp, z, zp, True, dx, eta,
                                   Q, False, False, samp_u, samp_l, rng, counts)
            for i in range(dy):
                hg[i] += g1[i] - g0[i]
            for i in range(dx):
                hf[i] += f1[i] - f0[i]
        if not _steps_from_estimates(x, y, xp, yp, hg, hf, fpar, k, proj):
            return DIVERGED, it
    return OK, n_iter
