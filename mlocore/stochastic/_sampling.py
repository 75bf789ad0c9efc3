"""CPU building blocks of the stochastic loops (numba ``@njit(cache=True)``): random
numbers, samplers, schedules, projections, minibatch oracles, the stochastic Neumann
estimators and the two-point estimates of the variance-reduced methods.

Every stochastic method has one CPU kernel (in its own module) with the same signature::

    run(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar,
        samp_u, samp_l, rng, proj, k0, n_iter, counts) -> (status, iterations_done)

It advances ``x``, ``y`` and its own state ``work`` in place by ``n_iter`` iterations,
numbered from ``k0`` (schedules depend on the global iteration number), so that running
1000 iterations in one call or in ten calls gives bit-identical results: the random
generator's state ``rng`` and the samplers' positions live in arrays that persist between
calls. ``status`` is ``OK`` or ``DIVERGED`` (a non-finite iterate; the loop stops there).

Conventions shared by the kernels
---------------------------------
- ``uflags``/``lflags``: the objectives' flag bits (:mod:`mlocore._kernels.oracles`): a step
  that needs one block (``grad_y g``, ``H_yy v``, ``H_xy v``, the upper ``grad_x f`` and
  ``grad_y f``) calls the block callback when it is given, else the joint one. Blocks take
  the same sample-index argument as the joint callbacks and draw no random numbers, so the
  random streams do not depend on which callbacks are given.
- ``uargs``/``largs``: an objective's args with one leading slot: the full index array of a
  stochastic objective (ignored here, the sampler's batch is passed instead) or ``None`` for
  a deterministic objective (then callbacks are called without ``idx``).
- ``fpar`` (float64): ``[alpha0, alpha_power, alpha_offset, beta0, beta_power, beta_offset,
  eta, ...]`` with step ``s_k = s0 * (offset / (offset + k))**power``; ``eta`` is the
  Neumann step (about ``1/L_g``). Methods append their own parameters.
- ``ipar`` (int64): ``[T, Q, ...]``: inner steps per outer step, Neumann terms.
- ``counts`` (int64, ``2 * N_COUNTERS``): calls per oracle kind, then samples per kind
  (the sum of batch sizes), the unit of the slides' sample complexities.
- ``proj = (mode, lb, ub, fn)``: 0 none, 1 box ``[lb, ub]``, 2 ball (center ``lb``,
  radius ``ub[0]``), 3 user projection ``fn(x) -> x`` (a first-class function).
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from .._config import FD_REL_STEP
from .._kernels.oracles import (FN_GRAD_X, FN_GRAD_Y, FN_HVP_XY, FN_HVP_YY, HAS_GRAD_X,
                                HAS_GRAD_Y, HAS_HVP, HAS_HVP_XY, HAS_HVP_YY, HAS_LOWER_BLOCKS,
                                LOWER_GRAD, LOWER_GRAD_Y, LOWER_HVP, LOWER_HVP_XY,
                                LOWER_HVP_YY, N_COUNTERS, UPPER_GRAD, UPPER_GRAD_X,
                                UPPER_GRAD_Y)

#: both upper gradient blocks: an upper gradient is two block calls instead of the joint one
HAS_UPPER_BLOCKS = HAS_GRAD_X | HAS_GRAD_Y

OK = 0
DIVERGED = 2

# parameter slots
ALPHA0, ALPHA_POW, ALPHA_OFF, BETA0, BETA_POW, BETA_OFF, ETA = 0, 1, 2, 3, 4, 5, 6
N_FPAR = 7
T_INNER, Q_TERMS = 0, 1
N_IPAR = 2

# sampler kinds
UNIFORM = 0   # with replacement
BATCHES = 1   # fixed contiguous minibatches of one shuffled order, visited in random order

U64_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
U64_M1 = np.uint64(0xBF58476D1CE4E5B9)
U64_M2 = np.uint64(0x94D049BB133111EB)
U64_S30 = np.uint64(30)
U64_S27 = np.uint64(27)
U64_S31 = np.uint64(31)
U64_S11 = np.uint64(11)
INV_2_53 = 1.0 / 9007199254740992.0


# ---------------------------------------------------------------------------------------
# Random numbers: SplitMix64 (Steele, Lea & Flood 2014), state in a uint64[1] array.
# ---------------------------------------------------------------------------------------
@njit(cache=True)
def rand_u64(rng):
    z = rng[0] + U64_GOLDEN
    rng[0] = z
    z = (z ^ (z >> U64_S30)) * U64_M1
    z = (z ^ (z >> U64_S27)) * U64_M2
    return z ^ (z >> U64_S31)


@njit(cache=True)
def rand_uniform(rng):
    """Uniform on [0, 1) with 53 random bits."""
    return float(rand_u64(rng) >> U64_S11) * INV_2_53


@njit(cache=True)
def rand_int(rng, n):
    """Uniform on {0, ..., n-1}."""
    i = int(rand_uniform(rng) * n)
    return i if i < n else n - 1


@njit(cache=True)
def rand_normal(rng):
    """Standard normal (Box-Muller; one of the pair is used)."""
    u = 1.0 - rand_uniform(rng)  # (0, 1]
    v = rand_uniform(rng)
    return np.sqrt(-2.0 * np.log(u)) * np.cos(2.0 * np.pi * v)


@njit(cache=True)
def shuffle(a, rng):
    """Fisher-Yates shuffle in place."""
    for i in range(a.shape[0] - 1, 0, -1):
        j = rand_int(rng, i + 1)
        t = a[i]
        a[i] = a[j]
        a[j] = t


# ---------------------------------------------------------------------------------------
# Samplers: samp = (state int64[4] = (kind, batch_size, n, position), perm, order, buf).
# ---------------------------------------------------------------------------------------
@njit(cache=True)
def draw(samp, rng):
    """Next minibatch: ``(idx, batch_id)``; ``batch_id`` is -1 for uniform sampling.

    UNIFORM: ``batch_size`` indices drawn with replacement into ``buf``.
    BATCHES: batch b is ``perm[b*bs : (b+1)*bs]`` (the last one may be shorter); the batches
    are visited in a random order reshuffled every epoch, so each batch is seen exactly once
    per epoch (what SABA's memory table needs).
    """
    st, perm, order, buf = samp
    if st[0] == UNIFORM:
        n = st[2]
        for i in range(buf.shape[0]):
            buf[i] = rand_int(rng, n)
        return buf, -1
    nb = order.shape[0]
    if st[3] >= nb:
        if nb > 1:
            shuffle(order, rng)
        st[3] = 0
    b = order[st[3]]
    st[3] += 1
    start = b * st[1]
    stop = min(start + st[1], st[2])
    return perm[start:stop], b


@njit(cache=True)
def batch_of(samp, b):
    """The indices of fixed batch ``b`` (BATCHES samplers)."""
    st, perm, order, buf = samp
    start = b * st[1]
    return perm[start:min(start + st[1], st[2])]


# ---------------------------------------------------------------------------------------
# Schedules and projections
# ---------------------------------------------------------------------------------------
@njit(cache=True)
def step_at(fpar, base, k):
    """``s0 * (offset / (offset + k))**power`` with ``(s0, power, offset) = fpar[base:base+3]``."""
    s0 = fpar[base]
    p = fpar[base + 1]
    if p == 0.0:
        return s0
    off = fpar[base + 2]
    return s0 * (off / (off + k)) ** p


@njit(cache=True)
def project(x, proj):
    """Project x in place onto the upper feasible set."""
    mode, lb, ub, fn = proj
    if mode == 1:
        for i in range(x.shape[0]):
            if x[i] < lb[i]:
                x[i] = lb[i]
            elif x[i] > ub[i]:
                x[i] = ub[i]
    elif mode == 2:
        r = ub[0]
        s = 0.0
        for i in range(x.shape[0]):
            s += (x[i] - lb[i]) ** 2
        s = np.sqrt(s)
        if s > r:
            c = r / s
            for i in range(x.shape[0]):
                x[i] = lb[i] + c * (x[i] - lb[i])
    elif mode == 3:
        p = fn(x.copy())
        if p.shape[0] != x.shape[0]:
            raise ValueError("callback project returned an array whose size differs from x")
        x[:] = p


@njit(cache=True)
def upper_step(x, h, alpha, proj):
    """``x <- P(x - alpha h)`` in place."""
    for i in range(x.shape[0]):
        x[i] -= alpha * h[i]
    project(x, proj)


@njit(cache=True)
def finite(a):
    for v in a:
        if not np.isfinite(v):
            return False
    return True


# ---------------------------------------------------------------------------------------
# Minibatch oracles. args[0] is the full index array (stochastic) or None (deterministic).
# ---------------------------------------------------------------------------------------
def _call1(fn, args, z, idx):
    pass


@overload(_call1)
def _call1_impl(fn, args, z, idx):
    if isinstance(args.types[0], types.NoneType):
        return lambda fn, args, z, idx: fn(z, *args[1:])
    return lambda fn, args, z, idx: fn(z, idx, *args[1:])


def _call2(fn, args, z, v, idx):
    pass


@overload(_call2)
def _call2_impl(fn, args, z, v, idx):
    if isinstance(args.types[0], types.NoneType):
        return lambda fn, args, z, v, idx: fn(z, v, *args[1:])
    return lambda fn, args, z, v, idx: fn(z, v, idx, *args[1:])


@njit(cache=True)
def _count(counts, slot, idx):
    counts[slot] += 1
    counts[N_COUNTERS + slot] += idx.shape[0]


@njit(cache=True)
def sgrad(fns, args, z, idx, counts, slot):
    """Minibatch gradient over z (mean over the samples in idx)."""
    _count(counts, slot, idx)
    g = _call1(fns[0], args, z, idx)
    if g.shape[0] != z.shape[0]:
        raise ValueError("a stochastic grad callback returned an array whose size differs "
                         "from z")
    return g


@njit(cache=True)
def svalue(fns, args, z, idx, counts, slot):
    _count(counts, slot, idx)
    return float(_call1(fns[2], args, z, idx))


@njit(cache=True)
def shvp(fns, args, flags, z, v, idx, counts, slot_hvp, slot_grad):
    """Minibatch Hessian (over z) times v; central differences of grad on the same batch
    when the objective has no hvp callback (``flags`` without ``HAS_HVP``)."""
    if flags & HAS_HVP:
        _count(counts, slot_hvp, idx)
        h = _call2(fns[1], args, z, v, idx)
        if h.shape[0] != z.shape[0]:
            raise ValueError("a stochastic hvp callback returned an array whose size differs "
                             "from z")
        return h
    vn = np.sqrt(v @ v)
    if vn == 0.0:
        return np.zeros(z.shape[0])
    eps = FD_REL_STEP * (1.0 + np.sqrt(z @ z)) / vn
    _count(counts, slot_grad, idx)
    _count(counts, slot_grad, idx)
    gp = _call1(fns[0], args, z + eps * v, idx)
    gm = _call1(fns[0], args, z - eps * v, idx)
    if gp.shape[0] != z.shape[0] or gm.shape[0] != z.shape[0]:
        raise ValueError("a stochastic grad callback (in a difference HVP) returned an array "
                         "whose size differs from z")
    return (gp - gm) / (2.0 * eps)


@njit(cache=True)
def joint_into(z, x, y):
    dx = x.shape[0]
    z[:dx] = x
    z[dx:] = y


@njit(cache=True)
def _joint_cross(lfns, largs, flags, z, v, dx, idx, counts):
    """The lower HVP with direction (0, v) on batch idx (joint callback or differences)."""
    w = np.zeros(z.shape[0])
    w[dx:] = v
    return shvp(lfns, largs, flags, z, w, idx, counts, LOWER_HVP, LOWER_GRAD)


@njit(cache=True)
def lower_yy(lfns, largs, flags, z, v, dx, idx, counts):
    """``H_yy v`` of the lower objective on batch idx: the ``hvp_yy`` block, or the y-block
    of one joint product with (0, v)."""
    if flags & HAS_HVP_YY:
        _count(counts, LOWER_HVP_YY, idx)
        h = _call2(lfns[FN_HVP_YY], largs, z, v, idx)
        if h.shape[0] != v.shape[0]:
            raise ValueError("a stochastic hvp_yy callback returned an array whose size "
                             "differs from y")
        return h
    return _joint_cross(lfns, largs, flags, z, v, dx, idx, counts)[dx:].copy()


@njit(cache=True)
def lower_xy(lfns, largs, flags, z, v, dx, idx, counts):
    """``H_xy v`` (length dx) of the lower objective on batch idx: the ``hvp_xy`` block, or
    the x-block of one joint product with (0, v)."""
    if flags & HAS_HVP_XY:
        _count(counts, LOWER_HVP_XY, idx)
        h = _call2(lfns[FN_HVP_XY], largs, z, v, idx)
        if h.shape[0] != dx:
            raise ValueError("a stochastic hvp_xy callback returned an array whose size "
                             "differs from x")
        return h
    return _joint_cross(lfns, largs, flags, z, v, dx, idx, counts)[:dx].copy()


@njit(cache=True)
def lower_cross(lfns, largs, flags, z, v, dx, idx, counts):
    """``(H_xy v, H_yy v)`` of the lower objective on batch idx: the two blocks when both
    are given, else one joint HVP with (0, v)."""
    if (flags & HAS_LOWER_BLOCKS) == HAS_LOWER_BLOCKS:
        return (lower_xy(lfns, largs, flags, z, v, dx, idx, counts),
                lower_yy(lfns, largs, flags, z, v, dx, idx, counts))
    h = _joint_cross(lfns, largs, flags, z, v, dx, idx, counts)
    return h[:dx].copy(), h[dx:].copy()


@njit(cache=True)
def lower_grad_y(lfns, largs, flags, z, dx, idx, counts):
    """``grad_y g`` on batch idx: the ``grad_y`` block, or the y-block of the joint
    gradient."""
    if flags & HAS_GRAD_Y:
        _count(counts, LOWER_GRAD_Y, idx)
        g = _call1(lfns[FN_GRAD_Y], largs, z, idx)
        if g.shape[0] != z.shape[0] - dx:
            raise ValueError("a stochastic grad_y callback returned an array whose size "
                             "differs from y")
        return g
    return sgrad(lfns, largs, z, idx, counts, LOWER_GRAD)[dx:].copy()


@njit(cache=True)
def upper_grad(ufns, uargs, flags, z, dx, idx, counts):
    """The upper gradient over z on batch idx: ``(grad_x f, grad_y f)`` from the two blocks
    when both are given, else the joint gradient."""
    if (flags & HAS_UPPER_BLOCKS) == HAS_UPPER_BLOCKS:
        g = np.empty(z.shape[0])
        _count(counts, UPPER_GRAD_X, idx)
        gx = _call1(ufns[FN_GRAD_X], uargs, z, idx)
        _count(counts, UPPER_GRAD_Y, idx)
        gy = _call1(ufns[FN_GRAD_Y], uargs, z, idx)
        if gx.shape[0] != dx or gy.shape[0] != z.shape[0] - dx:
            raise ValueError("a stochastic upper grad_x or grad_y callback returned an array "
                             "whose size differs from x or y")
        g[:dx] = gx
        g[dx:] = gy
        return g
    return sgrad(ufns, uargs, z, idx, counts, UPPER_GRAD)


@njit(cache=True)
def neumann_sum(lfns, largs, lflags, z, b, dx, eta, Q, samp_l, rng, counts):
    """StocBiO's estimator ``eta * sum_{q<Q} prod_{j<=q} (I - eta H_yy(xi_j)) b`` of
    ``H_yy^{-1} b``, a fresh minibatch per factor (unbiased for the truncated series
    ``eta * sum_{q<Q} (I - eta H_yy)^q b``). Q - 1 HVPs."""
    p = b.copy()
    v = b.copy()
    for q in range(1, Q):
        idx, _ = draw(samp_l, rng)
        hp = lower_yy(lfns, largs, lflags, z, p, dx, idx, counts)
        p -= eta * hp
        v += p
    return eta * v


@njit(cache=True)
def neumann_random(lfns, largs, lflags, z, b, dx, eta, Q, samp_l, rng, counts):
    """Ghadimi & Wang's estimator ``eta * Q * prod_{j<=q} (I - eta H_yy(xi_j)) b`` with q
    uniform on {0, .., Q-1}: unbiased for the same truncated series, q HVPs."""
    q = rand_int(rng, Q)
    p = b.copy()
    for j in range(q):
        idx, _ = draw(samp_l, rng)
        hp = lower_yy(lfns, largs, lflags, z, p, dx, idx, counts)
        p -= eta * hp
    return (eta * Q) * p


@njit(cache=True)
def hypergrad_estimate(ufns, uargs, lfns, largs, uflags, lflags, z, dx, eta, Q, samp_u, samp_l,
                       rng, counts, randomized):
    """``grad_x f - H_xy v`` with v a stochastic Neumann estimate of ``H_yy^{-1} grad_y f``
    (upper batch for grad f, fresh lower batches for the Neumann factors and for H_xy)."""
    idx_u, _ = draw(samp_u, rng)
    gf = upper_grad(ufns, uargs, uflags, z, dx, idx_u, counts)
    b = gf[dx:].copy()
    if randomized:
        v = neumann_random(lfns, largs, lflags, z, b, dx, eta, Q, samp_l, rng, counts)
    else:
        v = neumann_sum(lfns, largs, lflags, z, b, dx, eta, Q, samp_l, rng, counts)
    idx_l, _ = draw(samp_l, rng)
    hx = lower_xy(lfns, largs, lflags, z, v, dx, idx_l, counts)
    return gf[:dx] - hx


@njit(cache=True)
def inner_sgd(lfns, largs, lflags, z, x, y, dx, beta, T, samp_l, rng, counts):
    """T minibatch gradient steps on y (x fixed): ``y -= beta * grad_y g(x, y; xi)``."""
    for t in range(T):
        joint_into(z, x, y)
        idx, _ = draw(samp_l, rng)
        g = lower_grad_y(lfns, largs, lflags, z, dx, idx, counts)
        for i in range(y.shape[0]):
            y[i] -= beta * g[i]


# ---------------------------------------------------------------------------------------
# Two-point estimates (SUSTAIN, MRBO, VRBO): the same minibatches at two points
# ---------------------------------------------------------------------------------------
def full_index(args, samp):
    pass


@overload(full_index)
def full_index_impl(args, samp):
    """The index array of the full batch: ``args[0]`` for a stochastic objective; for a
    deterministic one (``args[0] is None``, idx ignored) the sampler's one-sample array."""
    if isinstance(args.types[0], types.NoneType):
        return lambda args, samp: samp[1]
    return lambda args, samp: args[0]


@njit(cache=True)
def steps_from_estimates(x, y, xp, yp, hg, hf, fpar, k, proj):
    """Remember (x, y) as the previous point, then ``y -= beta_k hg`` and
    ``x <- P(x - alpha_k hf)``; False when an iterate or estimate is non-finite."""
    xp[:] = x
    yp[:] = y
    beta = step_at(fpar, BETA0, k)
    for i in range(y.shape[0]):
        y[i] -= beta * hg[i]
    upper_step(x, hf, step_at(fpar, ALPHA0, k), proj)
    return finite(x) and finite(y) and finite(hf) and finite(hg)


@njit(cache=True)
def neumann_pair(ufns, uargs, lfns, largs, uflags, lflags, z1, z0, two, dx, eta, Q, randomized,
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
        idx_u = full_index(uargs, samp_u)
    else:
        idx_u, _ = draw(samp_u, rng)
    gf1 = upper_grad(ufns, uargs, uflags, z1, dx, idx_u, counts)
    gf0 = upper_grad(ufns, uargs, uflags, z0, dx, idx_u, counts) if two else gf1
    p1 = gf1[dx:].copy()
    p0 = gf0[dx:].copy()
    s1 = p1.copy()
    s0 = p0.copy()
    nq = rand_int(rng, Q) if randomized else Q - 1
    for j in range(nq):
        if full:
            idx = full_index(largs, samp_l)
        else:
            idx, _ = draw(samp_l, rng)
        hp1 = lower_yy(lfns, largs, lflags, z1, p1, dx, idx, counts)
        p1 -= eta * hp1
        s1 += p1
        if two:
            hp0 = lower_yy(lfns, largs, lflags, z0, p0, dx, idx, counts)
            p0 -= eta * hp0
            s0 += p0
    if randomized:
        v1 = (eta * Q) * p1
        v0 = (eta * Q) * p0
    else:
        v1 = eta * s1
        v0 = eta * s0
    if full:
        idx_l = full_index(largs, samp_l)
    else:
        idx_l, _ = draw(samp_l, rng)
    hx1 = lower_xy(lfns, largs, lflags, z1, v1, dx, idx_l, counts)
    h1 = gf1[:dx] - hx1
    if not two:
        return h1, h1
    hx0 = lower_xy(lfns, largs, lflags, z0, v0, dx, idx_l, counts)
    return h1, gf0[:dx] - hx0


@njit(cache=True)
def lower_grad_pair(lfns, largs, lflags, z1, z0, two, dx, idx, counts):
    """``grad_y g`` on batch idx at ``z1`` and (if ``two``) at ``z0``."""
    g1 = lower_grad_y(lfns, largs, lflags, z1, dx, idx, counts)
    if not two:
        return g1, g1
    g0 = lower_grad_y(lfns, largs, lflags, z0, dx, idx, counts)
    return g1, g0
