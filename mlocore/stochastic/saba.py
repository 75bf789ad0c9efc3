"""SABA (Dagreou, Ablin, Vaiter & Moreau 2022, "A framework for bilevel optimization that
enables stochastic and global variance reduction algorithms", NeurIPS): SOBA with SAGA
variance reduction over fixed minibatches.

Iteration k (lower batch j and upper batch i drawn independently, each fixed batch visited
once per epoch in a reshuffled order)::

    y <- y - rho_k  D[grad_y g]
    v <- v - rho_k (D[H_yy v] - D[grad_y f])
    x <- P(x - gamma_k (D[grad_x f] - D[H_xy v]))

``D[q] = w_j (q_j(x, y, v) - m_j) + sum_b (|B_b| / n) m_b`` is the SAGA estimate of the
full-batch quantity q, ``m_j`` the memory row of batch j (overwritten by ``q_j`` after use)
and ``w_j = n_batches |B_j| / n``.

Work layout (``res.state["work"]``, :func:`saba_tables` unpacks it): see
:func:`saba_layout`: ``[v (dy) | filled flag (1) | lower means (2dy+dx) | upper means
(dy+dx) | lower table (nb_l rows of 2dy+dx) | upper table (nb_u rows of dy+dx)]``; a lower
row is ``(grad_y g_j, H_yy,j v, H_xy,j v)``, an upper row ``(grad_y f_i, grad_x f_i)``.

Defaults: constant steps (as in the paper) ``0.5/L_F`` and ``1/(3 L_g)`` (chosen by
measurement); the last iterate is returned (``average=0``): SABA converges linearly to x*.
"""
import numpy as np
from numba import njit

from .._validation import check_choice
from ._device import DeviceMethod, batch_len, cuda, dl, launch
from ._sampling import (ALPHA0, BATCHES, BETA0, DIVERGED, N_IPAR, OK, batch_of, draw,
                        finite, joint_into, lower_cross, lower_grad_y, project, step_at,
                        upper_grad)
from ._spec import MethodSpec

__all__ = ["SPEC", "saba_tables", "saba_layout"]

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
def _saba_lower_row(lfns, largs, lflags, z, v, dx, dy, idx, counts, row):
    """``row = (grad_y g, H_yy v, H_xy v)`` on batch idx at z."""
    gg = lower_grad_y(lfns, largs, lflags, z, dx, idx, counts)
    hx, hy = lower_cross(lfns, largs, lflags, z, v, dx, idx, counts)
    row[:dy] = gg
    row[dy:2 * dy] = hy
    row[2 * dy:] = hx


@njit(cache=True)
def _saba_upper_row(ufns, uargs, uflags, z, dx, dy, idx, counts, row):
    """``row = (grad_y f, grad_x f)`` on batch idx at z."""
    gf = upper_grad(ufns, uargs, uflags, z, dx, idx, counts)
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
def run_saba(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar, samp_u,
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
                _saba_lower_row(lfns, largs, lflags, z, v, dx, dy, idx, counts, table_l[b])
                mean_l += (idx.shape[0] / n_l) * table_l[b]
            for b in range(nb_u):
                idx = batch_of(samp_u, b)
                _saba_upper_row(ufns, uargs, uflags, z, dx, dy, idx, counts, table_u[b])
                mean_u += (idx.shape[0] / n_u) * table_u[b]
        work[flag] = 1.0
    for it in range(n_iter):
        k = k0 + it
        rho = step_at(fpar, BETA0, k)
        gamma = step_at(fpar, ALPHA0, k)
        joint_into(z, x, y)
        idx_l, j = draw(samp_l, rng)
        idx_u, i = draw(samp_u, rng)
        _saba_lower_row(lfns, largs, lflags, z, v, dx, dy, idx_l, counts, new_l)
        _saba_upper_row(ufns, uargs, uflags, z, dx, dy, idx_u, counts, new_u)
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



_SABA_INIT = {"zeros": SABA_INIT_ZEROS, "full": SABA_INIT_FULL}


def _setup_saba(ctx, opts):
    """SABA: SOBA with SAGA variance reduction (Dagreou, Ablin, Vaiter & Moreau, "A framework
    for bilevel optimization that enables stochastic and global variance reduction
    algorithms", NeurIPS 2022).

    Iteration (lower batch j and upper batch i drawn independently, each fixed batch visited
    once per epoch in a reshuffled order)::

        y <- y - beta_k  D[grad_y g]
        v <- v - beta_k (D[H_yy v] - D[grad_y f])
        x <- P(x - alpha_k (D[grad_x f] - D[H_xy v]))

    ``D[q] = w_j (q_j(x, y, v) - m_j) + sum_b (|B_b| / n) m_b`` is the SAGA estimate of the
    full-batch quantity q, ``m_j`` the memory row of batch j (overwritten by ``q_j`` after
    use) and ``w_j = n_batches |B_j| / n`` (1 when all batches have the same size; it keeps
    the estimate unbiased when the last batch is shorter). The running means are updated in
    O(d) per step.

    Parameters
    ----------
    memory_init : {"full", "zeros"}, default "full"
        "full": before the first iteration one pass over all batches fills the tables at
        ``(x0, y0, v0 = 0)`` (one epoch of lower gradients, upper gradients and lower cross
        HVPs, counted in ``oracle_calls``); the estimates are then unbiased from the first
        step. "zeros": tables and means start at zero, as in the authors' reference
        implementation (the first epoch's estimates are biased towards zero).

    Notes
    -----
    Assumptions: g strongly convex in y, f and g smooth, **fixed minibatches**
    (``sampler="batches"``, the default; "uniform" is refused). Constant steps (the default
    schedules ``alpha_power = beta_power = 0``) are what SABA's analysis uses: O(1/K)
    stationarity, linear convergence under a PL condition, to the exact solution (no noise
    ball). SAGA-type estimates need a smaller lower step than SOBA, about ``1/(3 L_g)``
    (SAGA's ``1/(3 L)``): ``1/L_g`` diverges on mlocore's stochastic quadratic at batch size
    32 while ``0.3/L_g`` converges linearly; the default lower step is ``1/(3 L_g)``
    (``beta_safety`` in the registry). That is still too large on
    ``make_quadratic(10, 20, 1000, 1000)`` at batch size 64 (the iterates grow
    geometrically; the driver's backtracking halves both default steps once and the run
    then converges linearly): the safe step depends on the smoothness of every table row,
    not only on ``lambda_max(H_yy)``.
    Per iteration: one lower gradient, one lower cross HVP ``(H_xy v, H_yy v)`` (two
    lower gradients when the lower objective has no hvp) and one upper gradient, on one
    minibatch each. Memory: ``n_batches_lower (2 dy + dx) + n_batches_upper (dy + dx)``
    floats. ``res.state["work"]`` holds v, the means and the tables
    (:func:`saba_tables` unpacks it).
    """
    if ctx.sampler != "batches":
        raise ValueError(f"SABA needs fixed minibatches (sampler='batches'), got "
                         f"sampler={ctx.sampler!r}")
    mode = check_choice("memory_init", opts["memory_init"], tuple(_SABA_INIT))
    nb_l, nb_u = ctx.n_batches_lower, ctx.n_batches_upper
    size = saba_layout(ctx.dx, ctx.dy, nb_l, nb_u)[-1]
    return np.zeros(size), [], [_SABA_INIT[mode]]


def saba_tables(work, dx, dy, nb_lower, nb_upper):
    """Views of SABA's final ``work`` array: ``dict(v, filled, mean_lower, mean_upper,
    table_lower, table_upper)``; a lower row is ``(grad_y g_j, H_yy,j v, H_xy,j v)``, an upper
    row ``(grad_y f_i, grad_x f_i)``."""
    flag, ml, mu, tl, tu, size = saba_layout(dx, dy, nb_lower, nb_upper)
    if work.shape != (size,):
        raise ValueError(f"expected a SABA work array of size {size}, got shape={work.shape}")
    rl, ru = 2 * dy + dx, dy + dx
    return {"v": work[:dy], "filled": bool(work[flag]), "mean_lower": work[ml:ml + rl],
            "mean_upper": work[mu:mu + ru],
            "table_lower": work[tl:tl + nb_lower * rl].reshape(nb_lower, rl),
            "table_upper": work[tu:tu + nb_upper * ru].reshape(nb_upper, ru)}



# Device loop ---------------------------------------------------------------------------
@cuda.jit(device=True)
def _saba_row_entry(gg, h, gf, dx, dy, t):
    """Entry t of the concatenated rows: lower ``(grad_y g, H_yy v, H_xy v)`` (2 dy + dx
    entries), then upper ``(grad_y f, grad_x f)`` (dy + dx entries)."""
    rl = 2 * dy + dx
    if t < dy:
        return gg[dx + t]
    if t < 2 * dy:
        return h[dx + t - dy]
    if t < rl:
        return h[t - 2 * dy]
    u = t - rl
    if u < dy:
        return gf[dx + u]
    return gf[u - dy]


@cuda.jit
def _saba_fill_kernel(work, gg, h, gf, dx, dy, upper, row_off, mean_off, frac):
    """Full memory initialisation, one batch: ``row = new``, ``mean += frac row`` for the
    lower row (``upper`` 0) or the upper row (``upper`` 1)."""
    rl = 2 * dy + dx
    width = dy + dx if upper else rl
    shift = rl if upper else 0
    for t in range(cuda.grid(1), width, cuda.gridsize(1)):
        new = _saba_row_entry(gg, h, gf, dx, dy, t + shift)
        work[row_off + t] = new
        work[mean_off + t] += frac * new


@cuda.jit
def _saga_kernel(work, gg, h, gf, dx, dy, mean_off, row_l, row_u, w_l, f_l, w_u, f_u, d):
    """SAGA estimates of both levels' rows (the CPU ``_saga_update``, entry by entry)::

        d = w (new - row) + mean;  mean += f (new - row);  row = new

    ``d[:2 dy + dx]`` lower, ``d[2 dy + dx:]`` upper; the lower mean is followed by the upper
    one in ``work`` (from ``mean_off``), ``row_l`` / ``row_u`` are the rows' offsets."""
    rl = 2 * dy + dx
    for t in range(cuda.grid(1), rl + dy + dx, cuda.gridsize(1)):
        new = _saba_row_entry(gg, h, gf, dx, dy, t)
        if t < rl:
            r = row_l + t
            w = w_l
            f = f_l
        else:
            r = row_u + t - rl
            w = w_u
            f = f_u
        diff = new - work[r]
        d[t] = w * diff + work[mean_off + t]
        work[mean_off + t] += f * diff
        work[r] = new


@cuda.jit
def _saba_step_kernel(z, v, d, dx, dy, rho, gamma):
    """SABA's joint step from the SAGA estimates d (lower row, then upper row)::

        y <- y - rho D[grad_y g];  v <- v - rho (D[H_yy v] - D[grad_y f]);
        x <- x - gamma (D[grad_x f] - D[H_xy v])
    """
    rl = 2 * dy + dx
    for i in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        if i < dx:
            z[i] -= gamma * (d[rl + dy + i] - d[2 * dy + i])
        else:
            q = i - dx
            z[i] -= rho * d[q]
            v[q] -= rho * (d[dy + q] - d[rl + q])


class DeviceSaba(DeviceMethod):
    """:func:`run_saba` on the device: the tables in the CPU's work layout (v is kept in the
    run's ``wv`` until the end)."""

    def __init__(self, r):
        super().__init__(r)
        dx, dy = r.dx, r.dy
        self.full_init = int(r.iextra[0]) == SABA_INIT_FULL
        self.o_flag, self.o_ml, self.o_mu, self.o_tl, self.o_tu, size = saba_layout(
            dx, dy, r.samp_l.nb, r.samp_u.nb)
        self.rl, self.ru = 2 * dy + dx, dy + dx
        self.work = dl.zeros(size)
        self.d_saga = dl.empty(self.rl + self.ru)
        self.filled = np.zeros(1, dtype=np.int64)
        self.check = r.v
        self.saved = (self.work, self.filled)

    def prepare(self):
        """Before the first iteration (and again after a rewind to the start): the tables
        filled by one pass over all batches at the current point (``memory_init="full"``),
        or left at zero; then the flag ``work[flag]`` is set."""
        if self.filled[0]:
            return
        r, work = self.r, self.work
        dx, dy, rl, ru = r.dx, r.dy, self.rl, self.ru
        if self.full_init:
            dl.fill(work[self.o_ml:self.o_tl], 0.0)
            for b in range(r.samp_l.nb):
                idx = r.samp_l.batch(b)
                r.lower.grad(r.z, idx, r.gg)
                r.lower.hvp(r.z, r.wv, idx, r.h)
                launch(_saba_fill_kernel, rl, work, r.gg, r.h, r.gf, dx, dy, 0,
                       self.o_tl + b * rl, self.o_ml, batch_len(idx) / r.samp_l.n)
            for b in range(r.samp_u.nb):
                idx = r.samp_u.batch(b)
                r.upper.grad(r.z, idx, r.gf)
                launch(_saba_fill_kernel, ru, work, r.gg, r.h, r.gf, dx, dy, 1,
                       self.o_tu + b * ru, self.o_mu, batch_len(idx) / r.samp_u.n)
        dl.fill(work[self.o_flag:self.o_flag + 1], 1.0)
        self.filled[0] = 1

    def iteration(self, k):
        r = self.r
        dx, dy, rl, ru = r.dx, r.dy, self.rl, self.ru
        rho = r.beta_at(k)
        gamma = r.alpha_at(k)
        idx_l, j = r.samp_l.draw_batch()
        idx_u, i = r.samp_u.draw_batch()
        r.lower.grad(r.z, idx_l, r.gg)
        r.lower.hvp(r.z, r.wv, idx_l, r.h)
        r.upper.grad(r.z, idx_u, r.gf)
        fl = batch_len(idx_l) / r.samp_l.n
        fu = batch_len(idx_u) / r.samp_u.n
        launch(_saga_kernel, rl + ru, self.work, r.gg, r.h, r.gf, dx, dy, self.o_ml,
               self.o_tl + j * rl, self.o_tu + i * ru, r.samp_l.nb * fl, fl,
               r.samp_u.nb * fu, fu, self.d_saga)
        launch(_saba_step_kernel, r.n, r.z, r.v, self.d_saga, dx, dy, rho, gamma)
        self.project()

    def state_work(self):
        dl.copy(self.r.v, self.work[:self.r.dy])  # the CPU layout: v first
        return self.work


SPEC = MethodSpec(run_saba, alpha_power=0.0, beta_power=0.0, sampler="batches", average=0.0,
                  beta_safety=1.0 / 3.0,
                  uses=(), options={"memory_init": "full"}, setup=_setup_saba,
                  doc="Dagreou et al. 2022: SOBA with SAGA tables on fixed minibatches",
                  device=DeviceSaba)
