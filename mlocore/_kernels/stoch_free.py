"""Stochastic loops without Hessian inverses: SABA (variance reduced SOBA), the Hessian-free
zeroth-order method PZOBO, the value-function penalty method and its primal-dual variant.

Signature and conventions: see :mod:`mlocore._kernels.stochastic`. Each iteration k is one
upper step; ``alpha_k`` (upper) and ``beta_k`` (lower) follow the schedules in ``fpar``.

Work layouts (the driver returns the final ``work`` as ``res.state["work"]``)
-------------------------------------------------------------------------------
- SABA: see :func:`saba_layout`: ``[v (dy) | filled flag (1) | lower means (2dy+dx) |
  upper means (dy+dx) | lower table (nb_l rows of 2dy+dx) | upper table (nb_u rows of
  dy+dx)]``; a lower row is ``(grad_y g_j, H_yy,j v, H_xy,j v)``, an upper row
  ``(grad_y f_i, grad_x f_i)``.
- Hessian-free: no state (``work`` is empty).
- penalty: ``[yhat (dy)]``; primal-dual: ``[yhat (dy) | multiplier rho (1)]`` (the
  multiplier is ``work[dy] == work[-1]``).
"""
import numpy as np
from numba import njit

from .oracles import LOWER_GRAD, LOWER_VALUE, UPPER_GRAD
from .stochastic import (ALPHA0, BATCHES, BETA0, DIVERGED, N_FPAR, N_IPAR, OK, T_INNER,
                         batch_of, draw, finite, joint_into, lower_cross, project, rand_normal,
                         sgrad, step_at, svalue)

# SABA: ipar[N_IPAR] = memory initialisation
SABA_INIT_ZEROS = 0
SABA_INIT_FULL = 1


@njit(cache=True)
def saba_layout(dx, dy, nb_l, nb_u):
    """Offsets of SABA's work array: ``(flag, mean_l, mean_u, table_l, table_u, size)``.

    ``v = work[:dy]``; ``work[flag]`` is 1 once the tables are filled; the lower row width
    is ``2 dy + dx`` (``grad_y g``, ``H_yy v``, ``H_xy v``), the upper one ``dy + dx``
    (``grad_y f``, ``grad_x f``)."""
    rl = 2 * dy + dx
    ru = dy + dx
    flag = dy
    mean_l = flag + 1
    mean_u = mean_l + rl
    table_l = mean_u + ru
    table_u = table_l + nb_l * rl
    size = table_u + nb_u * ru
    return flag, mean_l, mean_u, table_l, table_u, size


@njit(cache=True)
def _saba_lower_row(lfns, largs, has_lhvp, z, v, dx, dy, idx, counts, row):
    """``row = (grad_y g, H_yy v, H_xy v)`` on batch idx at z."""
    gg = sgrad(lfns, largs, z, idx, counts, LOWER_GRAD)
    hx, hy = lower_cross(lfns, largs, has_lhvp, z, v, dx, idx, counts)
    row[:dy] = gg[dx:]
    row[dy:2 * dy] = hy
    row[2 * dy:] = hx


@njit(cache=True)
def _saba_upper_row(ufns, uargs, z, dx, dy, idx, counts, row):
    """``row = (grad_y f, grad_x f)`` on batch idx at z."""
    gf = sgrad(ufns, uargs, z, idx, counts, UPPER_GRAD)
    row[:dy] = gf[dx:]
    row[dy:] = gf[:dx]


@njit(cache=True)
def _saga_update(new, table_row, mean, weight, frac, out):
    """SAGA estimator ``out = weight (new - row) + mean``, then ``mean += frac (new - row)``
    and ``row = new`` (O(d)). ``weight = n_batches |B| / n`` and ``frac = |B| / n`` make the
    running mean the sample-weighted mean of the rows (the full-batch quantity when all rows
    are evaluated at one point) and the estimator unbiased, also with a shorter last batch."""
    for i in range(new.shape[0]):
        d = new[i] - table_row[i]
        out[i] = weight * d + mean[i]
        mean[i] += frac * d
        table_row[i] = new[i]


@njit(cache=True)
def run_saba(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar, samp_u,
             samp_l, rng, proj, k0, n_iter, counts):
    """SABA (Dagreou et al. 2022): SOBA's joint steps on y, v, x with SAGA estimates of the
    five directions over fixed minibatches (lower batch j, upper batch i)::

        y <- y - rho_k  D[grad_y g]
        v <- v - rho_k (D[H_yy v] - D[grad_y f])
        x <- P(x - gamma_k (D[grad_x f] - D[H_xy v])),   D[q] = w_j (q_j - m_j) + mean(m)

    where m_j is the stored row of batch j (its quantities where it was last visited).
    With ``ipar[N_IPAR] == SABA_INIT_FULL`` the tables are filled by one pass over all batches
    at the initial point before the first iteration (work[flag] records that it was done)."""
    dx = x.shape[0]
    dy = y.shape[0]
    st_l = samp_l[0]
    st_u = samp_u[0]
    if st_l[0] != BATCHES or st_u[0] != BATCHES:
        raise ValueError("method 'saba' needs sampler='batches' (fixed minibatches, one "
                         "memory row per batch); got sampler='uniform'")
    nb_l = samp_l[2].shape[0]
    nb_u = samp_u[2].shape[0]
    n_l = st_l[2]
    n_u = st_u[2]
    flag, o_ml, o_mu, o_tl, o_tu, size = saba_layout(dx, dy, nb_l, nb_u)
    if work.shape[0] != size:
        raise ValueError("saba: work array has the wrong size for these batch counts")
    rl = 2 * dy + dx
    ru = dy + dx
    v = work[:dy]
    mean_l = work[o_ml:o_ml + rl]
    mean_u = work[o_mu:o_mu + ru]
    table_l = work[o_tl:o_tl + nb_l * rl].reshape((nb_l, rl))
    table_u = work[o_tu:o_tu + nb_u * ru].reshape((nb_u, ru))
    z = np.empty(dx + dy)
    new_l = np.empty(rl)
    new_u = np.empty(ru)
    d_l = np.empty(rl)
    d_u = np.empty(ru)
    if n_iter > 0 and work[flag] == 0.0:
        if ipar[N_IPAR] == SABA_INIT_FULL:
            joint_into(z, x, y)
            mean_l[:] = 0.0
            mean_u[:] = 0.0
            for b in range(nb_l):
                idx = batch_of(samp_l, b)
                _saba_lower_row(lfns, largs, has_lhvp, z, v, dx, dy, idx, counts, table_l[b])
                mean_l += (idx.shape[0] / n_l) * table_l[b]
            for b in range(nb_u):
                idx = batch_of(samp_u, b)
                _saba_upper_row(ufns, uargs, z, dx, dy, idx, counts, table_u[b])
                mean_u += (idx.shape[0] / n_u) * table_u[b]
        work[flag] = 1.0
    for it in range(n_iter):
        k = k0 + it
        rho = step_at(fpar, BETA0, k)
        gamma = step_at(fpar, ALPHA0, k)
        joint_into(z, x, y)
        idx_l, j = draw(samp_l, rng)
        idx_u, i = draw(samp_u, rng)
        _saba_lower_row(lfns, largs, has_lhvp, z, v, dx, dy, idx_l, counts, new_l)
        _saba_upper_row(ufns, uargs, z, dx, dy, idx_u, counts, new_u)
        fl = idx_l.shape[0] / n_l
        fu = idx_u.shape[0] / n_u
        _saga_update(new_l, table_l[j], mean_l, nb_l * fl, fl, d_l)
        _saga_update(new_u, table_u[i], mean_u, nb_u * fu, fu, d_u)
        for q in range(dy):
            y[q] -= rho * d_l[q]
            v[q] -= rho * (d_l[dy + q] - d_u[q])
        for p in range(dx):
            x[p] -= gamma * (d_u[dy + p] - d_l[2 * dy + p])
        project(x, proj)
        if not (finite(x) and finite(y) and finite(v)):
            return DIVERGED, it
    return OK, n_iter


# ---------------------------------------------------------------------------------------
# Hessian-free (PZOBO)
# ---------------------------------------------------------------------------------------
HF_DIRECTIONS = N_IPAR      # ipar slot: number of Gaussian directions Q
HF_SMOOTHING = N_FPAR       # fpar slot: smoothing mu


@njit(cache=True)
def _replay_sgd(lfns, largs, z, x, y, dx, beta, T, ibuf, lens, bs, counts):
    """T lower SGD steps on y (x fixed) on the recorded batches ``ibuf[t*bs : t*bs+lens[t]]``."""
    for t in range(T):
        joint_into(z, x, y)
        idx = ibuf[t * bs:t * bs + lens[t]]
        g = sgrad(lfns, largs, z, idx, counts, LOWER_GRAD)
        for i in range(y.shape[0]):
            y[i] -= beta * g[dx + i]


@njit(cache=True)
def run_hessian_free(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar,
                     samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """PZOBO (Sow, Ji & Liang 2022a): per iteration, T lower SGD steps from the warm start
    y_k on T recorded minibatches give y_T(x); Q perturbed runs from the same y_k on the same
    minibatches give y_T(x + mu u_q), u_q ~ N(0, I); with
    ``delta_q = (y_T(x + mu u_q) - y_T(x)) / mu`` (about ``J u_q``, J = dy_T/dx)::

        h = grad_x f(x, y_T) + (1/Q) sum_q u_q <delta_q, grad_y f(x, y_T)>
        x <- P(x - alpha_k h),   y <- y_T

    (``E[u u^T] = I`` so h estimates ``grad_x f + J^T grad_y f``). Random numbers per
    iteration: the T lower batches, then Q*dx normals (u_0 first), then the upper batch.
    Gradients only: never calls an hvp."""
    dx = x.shape[0]
    dy = y.shape[0]
    T = ipar[T_INNER]
    Q = ipar[HF_DIRECTIONS]
    mu = fpar[HF_SMOOTHING]
    bs = samp_l[0][1]
    ibuf = np.empty(T * bs, dtype=np.int64)
    lens = np.empty(T, dtype=np.int64)
    z = np.empty(dx + dy)
    y0 = np.empty(dy)
    xp = np.empty(dx)
    dirs = np.empty((Q, dx))
    deltas = np.empty((Q, dy))
    h = np.empty(dx)
    for it in range(n_iter):
        k = k0 + it
        beta = step_at(fpar, BETA0, k)
        alpha = step_at(fpar, ALPHA0, k)
        for t in range(T):
            idx, _ = draw(samp_l, rng)
            m = idx.shape[0]
            lens[t] = m
            ibuf[t * bs:t * bs + m] = idx
        y0[:] = y
        _replay_sgd(lfns, largs, z, x, y, dx, beta, T, ibuf, lens, bs, counts)  # y = y_T(x)
        for q in range(Q):
            u = dirs[q]
            for p in range(dx):
                u[p] = rand_normal(rng)
                xp[p] = x[p] + mu * u[p]
            d = deltas[q]
            d[:] = y0
            _replay_sgd(lfns, largs, z, xp, d, dx, beta, T, ibuf, lens, bs, counts)
            for i in range(dy):
                d[i] = (d[i] - y[i]) / mu
        joint_into(z, x, y)
        idx_u, _ = draw(samp_u, rng)
        gf = sgrad(ufns, uargs, z, idx_u, counts, UPPER_GRAD)
        for p in range(dx):
            h[p] = gf[p]
        for q in range(Q):
            s = 0.0
            for i in range(dy):
                s += deltas[q, i] * gf[dx + i]
            s /= Q
            for p in range(dx):
                h[p] += s * dirs[q, p]
        for p in range(dx):
            x[p] -= alpha * h[p]
        project(x, proj)
        if not (finite(x) and finite(y)):
            return DIVERGED, it
    return OK, n_iter


# ---------------------------------------------------------------------------------------
# Value-function penalty and primal-dual (Sow et al. 2022b; lecture eqs. 25-29)
# ---------------------------------------------------------------------------------------
VF_A1, VF_A2, VF_RHO, VF_DUAL_STEP, VF_EPS = N_FPAR, N_FPAR + 1, N_FPAR + 2, N_FPAR + 3, \
    N_FPAR + 4


@njit(cache=True)
def _value_function_loop(ufns, uargs, lfns, largs, x, y, work, fpar, ipar, samp_u, samp_l,
                         rng, proj, k0, n_iter, counts, dual):
    dx = x.shape[0]
    dy = y.shape[0]
    T = ipar[T_INNER]
    a1 = fpar[VF_A1]
    a2 = fpar[VF_A2]
    yhat = work[:dy]
    if dual:
        rho = work[dy]
        dual_step = fpar[VF_DUAL_STEP]
        eps = fpar[VF_EPS]
    else:
        rho = fpar[VF_RHO]
        dual_step = 0.0
        eps = 0.0
    z = np.empty(dx + dy)
    zh = np.empty(dx + dy)
    for it in range(n_iter):
        k = k0 + it
        beta = step_at(fpar, BETA0, k)
        alpha = step_at(fpar, ALPHA0, k)
        # yhat: T SGD steps on g(x, .) + a1/2 |.|^2 (warm-started)
        for t in range(T):
            joint_into(zh, x, yhat)
            idx, _ = draw(samp_l, rng)
            g = sgrad(lfns, largs, zh, idx, counts, LOWER_GRAD)
            for i in range(dy):
                yhat[i] -= beta * (g[dx + i] + a1 * yhat[i])
        joint_into(z, x, y)
        joint_into(zh, x, yhat)
        idx_l, _ = draw(samp_l, rng)
        idx_u, _ = draw(samp_u, rng)
        gf = sgrad(ufns, uargs, z, idx_u, counts, UPPER_GRAD)
        gv = svalue(lfns, largs, z, idx_l, counts, LOWER_VALUE)
        hv = svalue(lfns, largs, zh, idx_l, counts, LOWER_VALUE)
        c = gv - hv - 0.5 * a1 * (yhat @ yhat) - a2
        w = rho if (dual or c > 0.0) else 0.0
        s = 1.0 / (1.0 + rho)
        if w != 0.0:
            gg = sgrad(lfns, largs, z, idx_l, counts, LOWER_GRAD)
            gh = sgrad(lfns, largs, zh, idx_l, counts, LOWER_GRAD)
            for p in range(dx):
                x[p] -= alpha * s * (gf[p] + w * (gg[p] - gh[p]))
            for i in range(dy):
                y[i] -= beta * s * (gf[dx + i] + w * gg[dx + i])
        else:
            for p in range(dx):
                x[p] -= alpha * s * gf[p]
            for i in range(dy):
                y[i] -= beta * s * gf[dx + i]
        project(x, proj)
        if dual:
            rho = max(0.0, rho + dual_step * (c - eps))
            work[dy] = rho
        if not (finite(x) and finite(y) and finite(yhat) and np.isfinite(rho)):
            return DIVERGED, it
    return OK, n_iter


@njit(cache=True)
def run_penalty(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar, samp_u,
                samp_l, rng, proj, k0, n_iter, counts):
    """Value-function penalty (lecture eqs. 26-28): per iteration, T warm-started SGD steps
    on ``yhat`` for ``g(x, .) + a1/2 |.|^2``; then, with one lower batch xi and one upper
    batch zeta, ``c = g(x, y; xi) - g(x, yhat; xi) - a1/2 |yhat|^2 - a2`` and one projected
    SGD step on the normalized penalty ``(f + rho max(0, c)) / (1 + rho)``::

        x <- P(x - alpha_k (grad_x f + rho [c > 0] (grad_x g(x, y) - grad_x g(x, yhat)))
                / (1 + rho))
        y <- y - beta_k (grad_y f + rho [c > 0] grad_y g(x, y)) / (1 + rho)

    (Danskin: ``grad v_a(x) = grad_x g(x, yhat)``)."""
    return _value_function_loop(ufns, uargs, lfns, largs, x, y, work, fpar, ipar, samp_u,
                                samp_l, rng, proj, k0, n_iter, counts, False)


@njit(cache=True)
def run_primal_dual(ufns, uargs, lfns, largs, has_uhvp, has_lhvp, x, y, work, fpar, ipar,
                    samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """Primal-dual value-function method (Sow et al. 2022b; lecture eq. 29): the penalty
    method's primal step on the Lagrangian ``(f + rho (g - v_a)) / (1 + rho)`` with the current
    multiplier ``rho = work[dy]`` (no max), then projected dual ascent
    ``rho <- max(0, rho + dual_step (c - eps))`` with the same minibatch estimate c of
    ``g(x, y) - v_a(x)`` (taken before the primal step)."""
    return _value_function_loop(ufns, uargs, lfns, largs, x, y, work, fpar, ipar, samp_u,
                                samp_l, rng, proj, k0, n_iter, counts, True)
