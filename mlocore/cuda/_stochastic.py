"""Stochastic bilevel loops on the device ("one large problem" mode): SOBA, SABA, StocBiO,
BSA, TTSA, stochastic AID-BiO and the alternating baseline here; SUSTAIN, MRBO, VRBO,
STABLE, Hessian-free (PZOBO), penalty and primal-dual in
:mod:`mlocore.cuda._stochastic_variance` (driven by this module's driver, which validates
their options with the CPU specs' ``setup`` functions).

The CPU driver :func:`mlocore._stochastic.minimize_stochastic` and its kernels
(:mod:`mlocore._kernels.stoch_implicit`, :mod:`mlocore._kernels.stoch_free`, ALGORITHMS.md
section 4) for a :class:`~mlocore.cuda.DeviceBilevelProblem`, with the same options, default
steps, status codes and result fields. What differs is where things live:

* The iterates x, y (one joint device vector z = concat(x, y)), SOBA's / SABA's / AID's v
  and SABA's SAGA tables stay on the device for the whole run; every vector update is one
  fused kernel.
* ``sampler="uniform"``: minibatch indices are drawn on the device, uniformly with
  replacement, by ``numba.cuda.random`` (xoroshiro128p, one generator state per thread of
  the draw launch, all created from ``seed``), into one int64 device array per level. These
  streams differ from the CPU's (SplitMix64), so such runs agree with the CPU in
  distribution only.
* ``sampler="batches"`` (SABA's default): the shuffled order of the samples is drawn once
  per run on the host by the CPU driver's generator (``SeedSequence(seed)``, the same
  calls in the same order) and copied to the device once (one counted copy per level); a
  batch is then a slice of that device array (no kernel, no copy per draw). The order in
  which the batches are visited (reshuffled every epoch) and BSA's / TTSA's random number
  of Neumann terms are drawn on the host with the CPU kernels' SplitMix64 stream: the host
  issues the callbacks, so it must know each batch's length (the last batch may be
  shorter), SABA's table row and the number of HVPs anyway, and a device draw would cost a
  synchronizing read-back per iteration. Runs whose randomness is all of this kind (SABA;
  any method with ``sampler="batches"`` on both levels) therefore reproduce the CPU run to
  rounding, minibatches included.
* A batch size equal to ``n_samples`` is the full batch in order (no randomness), as on the
  CPU: such runs reproduce the CPU's iterates to rounding.
* Between checkpoints nothing crosses the bus (the schedules' step sizes are kernel
  arguments computed on the host). At each checkpoint one counted device -> host copy brings
  back x together with ``|(x, y)|^2`` and ``sum |v|`` (the divergence test); divergence is
  therefore detected at checkpoints, not at the iteration where it happens.

Every host <-> device copy is counted in ``res.transfers``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import warnings

import numpy as np
from numba import cuda

with warnings.catch_warnings():  # under the simulator numba.cuda.random's host-side jit
    warnings.simplefilter("ignore")  # decorators warn (nopython=False) at import
    from numba.cuda.random import (create_xoroshiro128p_states, xoroshiro128p_dtype,
                                   xoroshiro128p_uniform_float64)
from scipy.optimize import OptimizeResult

from .._callbacks import CallbackError
from .._config import LIPSCHITZ_SAFETY, POWER_ITERS
from .._kernels import stochastic as _sk
from .._kernels.oracles import (LOWER_GRAD, LOWER_HVP, LOWER_VALUE,
                                N_COUNTERS, UPPER_GRAD, UPPER_HVP, UPPER_VALUE)
from .._results import status_message
from .._validation import check_choice, check_positive
from . import _linalg as dl
from ._device import Transfers, simulator_enabled, to_device, to_host
from ._problem import DeviceBilevelProblem, DeviceOracle

__all__ = ["minimize_stochastic", "DEVICE_STOCHASTIC_METHODS"]

#: methods with a device loop (the others of mlocore.STOCHASTIC_METHODS run on the CPU only)
DEVICE_STOCHASTIC_METHODS = ("soba", "saba", "stocbio", "bsa", "ttsa", "aid", "alternating",
                             "sustain", "mrbo", "vrbo", "stable", "hessian-free", "penalty",
                             "primal-dual")

_TPB = dl.THREADS_PER_BLOCK
_SIMULATOR = simulator_enabled()


# ---------------------------------------------------------------------------------------
# Kernels (float64 vectors, int64 indices; no allocation, no exceptions, no CPU calls)
# ---------------------------------------------------------------------------------------
@cuda.jit
def _uniform_indices_kernel(states, offset, idx, n):
    """``idx[i]`` uniform on {0, .., n-1} (with replacement); thread t uses generator state
    ``offset + t`` (grid-stride loop: a thread may draw several indices)."""
    t = cuda.grid(1)
    for i in range(t, idx.shape[0], cuda.gridsize(1)):
        u = xoroshiro128p_uniform_float64(states, offset + t)
        j = int(u * n)
        if j >= n:
            j = n - 1
        idx[i] = j


@cuda.jit
def _arange_kernel(idx, start):
    for i in range(cuda.grid(1), idx.shape[0], cuda.gridsize(1)):
        idx[i] = start + i


@cuda.jit
def _copy_states_kernel(src, dst):
    """Copy xoroshiro128p generator states (device to device)."""
    for i in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[i]['s0'] = src[i]['s0']
        dst[i]['s1'] = src[i]['s1']


@cuda.jit
def _soba_update_kernel(z, v, gg, h, gf, dx, rho, gamma):
    """SOBA's joint step, with gg = grad g(xi), h = H_g(xi) (0, v), gf = grad f(zeta), all
    over z = (x, y)::

        y <- y - rho grad_y g;  v <- v - rho (H_yy v - grad_y f);
        x <- x - gamma (grad_x f - H_xy v)
    """
    for i in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        if i < dx:
            z[i] -= gamma * (gf[i] - h[i])
        else:
            z[i] -= rho * gg[i]
            v[i - dx] -= rho * (h[i] - gf[i])


@cuda.jit
def _lower_sgd_kernel(z, g, dx, beta):
    """``y <- y - beta grad_y g`` (the y block of z and of the joint gradient g)."""
    for i in range(dx + cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        z[i] -= beta * g[i]


@cuda.jit
def _neumann_factor_kernel(p, acc, h, dx, eta):
    """One factor of StocBiO's Neumann sum: ``p <- p - eta H_yy p``; ``acc <- acc + p``."""
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i] -= eta * h[dx + i]
        acc[i] += p[i]


@cuda.jit
def _upper_step_kernel(z, gf, h, alpha, dx):
    """``x <- x - alpha (grad_x f - H_xy v)`` (the x block of z)."""
    for i in range(cuda.grid(1), dx, cuda.gridsize(1)):
        z[i] -= alpha * (gf[i] - h[i])


@cuda.jit
def _pack_kernel(buf, z, dx, scalars, slot_a, slot_b):
    """``buf = (x, scalars[slot_a], scalars[slot_b])``: one read-back per checkpoint."""
    for i in range(cuda.grid(1), dx + 2, cuda.gridsize(1)):
        if i < dx:
            buf[i] = z[i]
        elif i == dx:
            buf[i] = scalars[slot_a]
        else:
            buf[i] = scalars[slot_b]


@cuda.jit
def _combine_kernel(out, a, wa, b, wb, c):
    """``out = wa a + wb b - c`` (the mean check of minibatch callbacks)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = wa * a[i] + wb * b[i] - c[i]


@cuda.jit
def _upper_grad_step_kernel(z, gf, alpha, dx):
    """``x <- x - alpha grad_x f`` (the alternating baseline's upper step)."""
    for i in range(cuda.grid(1), dx, cuda.gridsize(1)):
        z[i] -= alpha * gf[i]


@cuda.jit
def _neumann_step_kernel(p, h, dx, eta):
    """One factor of the randomized Neumann estimator: ``p <- p - eta H_yy p``."""
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i] -= eta * h[dx + i]


# SABA ----------------------------------------------------------------------------------
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


# projection of x onto the upper feasible set (the CPU kernels' ``project``) --------------
@cuda.jit
def _clip_kernel(z, lb, ub):
    """``x <- min(max(x, lb), ub)`` on the x block of z (box bounds, as the CPU's mode 1)."""
    for i in range(cuda.grid(1), lb.shape[0], cuda.gridsize(1)):
        if z[i] < lb[i]:
            z[i] = lb[i]
        elif z[i] > ub[i]:
            z[i] = ub[i]


@cuda.jit
def _ball_kernel(z, center, radius, scratch):
    """``x <- c + r (x - c) / |x - c|`` when ``|x - c| > r`` (the CPU's mode 2). ONE block:
    every thread reads the block's sum of squares after the barrier (``scratch[0]``)."""
    dx = center.shape[0]
    acc = 0.0
    for i in range(cuda.threadIdx.x, dx, cuda.blockDim.x):
        d = z[i] - center[i]
        acc += d * d
    dl._block_sum_store(acc, scratch, 0)
    cuda.syncthreads()
    s = math.sqrt(scratch[0])
    if s > radius:
        c = radius / s
        for i in range(cuda.threadIdx.x, dx, cuda.blockDim.x):
            z[i] = center[i] + c * (z[i] - center[i])


class _DeviceProjection:
    """``x <- P(x)`` in place on the x block of the device iterate z, after every upper step
    (where the CPU kernels call ``project``): box bounds and :class:`mlocore.Ball` by a
    kernel (bounds / centre copied once, counted); a user ``project`` (a host function) by a
    round trip per call: x read back, projected and validated by ``problem.project``, copied
    back (two counted transfers per iteration: dx is the small side)."""

    def __init__(self, problem, counter):
        from .._problem import Ball
        self.problem, self.counter, self.dx = problem, counter, problem.dx
        user = problem._project
        self.mode = 0
        if isinstance(user, Ball):
            self.mode = 2
            self.center = to_device("Ball center", user.center_for(self.dx), counter,
                                    self.dx)
            self.radius = float(user.radius)
            self.scratch = dl.empty(1)
        elif user is not None:
            self.mode = 3
        elif problem.lb is not None:
            self.mode = 1
            self.lb = to_device("lower bounds", problem.lb, counter, self.dx)
            self.ub = to_device("upper bounds", problem.ub, counter, self.dx)

    def __call__(self, z):
        if self.mode == 1:
            _launch(_clip_kernel, self.dx, z, self.lb, self.ub)
        elif self.mode == 2:
            _ball_kernel[1, _TPB](z, self.center, self.radius, self.scratch)
        elif self.mode == 3:
            x = self.problem.project(to_host(z[:self.dx], self.counter))
            dl.copy(to_device("project(x)", x, self.counter, self.dx), z[:self.dx])


# stochastic AID-BiO: CG on one minibatch Hessian, breaks decided on the device -----------
_CG_RR, _CG_PAP, _CG_RRNEW, _CG_STEP, _CG_STOP = 0, 1, 2, 3, 4
_CG_SLOTS = 5


@cuda.jit
def _aid_residual_kernel(r, p, gf, h, dx):
    """``r = grad_y f - H_yy v`` (from the warm start v), ``p = r``."""
    for i in range(cuda.grid(1), r.shape[0], cuda.gridsize(1)):
        ri = gf[dx + i] - h[dx + i]
        r[i] = ri
        p[i] = ri


@cuda.jit
def _cg_reset_kernel(cg):
    if cuda.grid(1) == 0:
        cg[_CG_STOP] = 0.0


@cuda.jit
def _cg_gate_kernel(cg):
    """One thread: stop once ``r.r == 0`` or the curvature ``p.Hp`` is not > 0 (the CPU's two
    breaks; v is kept), else store the step ``r.r / p.Hp``."""
    if cuda.grid(1) != 0 or cg[_CG_STOP] != 0.0:
        return
    rr = cg[_CG_RR]
    php = cg[_CG_PAP]
    if rr == 0.0 or not php > 0.0:
        cg[_CG_STOP] = 1.0
    else:
        cg[_CG_STEP] = rr / php


@cuda.jit
def _cg_update_kernel(v, r, p, h, dx, cg):
    """``v += a p; r -= a H p`` unless stopped."""
    if cg[_CG_STOP] != 0.0:
        return
    a = cg[_CG_STEP]
    for i in range(cuda.grid(1), v.shape[0], cuda.gridsize(1)):
        v[i] += a * p[i]
        r[i] -= a * h[dx + i]


@cuda.jit
def _cg_direction_kernel(p, r, cg):
    """``p = r + (rr_new / rr) p`` unless stopped."""
    if cg[_CG_STOP] != 0.0:
        return
    beta = cg[_CG_RRNEW] / cg[_CG_RR]
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i] = r[i] + beta * p[i]


@cuda.jit
def _cg_commit_kernel(cg):
    if cuda.grid(1) == 0 and cg[_CG_STOP] == 0.0:
        cg[_CG_RR] = cg[_CG_RRNEW]


def _launch(kernel, n, *args):
    kernel[dl.grid_for(n), _TPB](*args)


@contextlib.contextmanager
def _quiet_simulated_arithmetic():
    """Under numba's simulator kernels run on NumPy scalars, which warn where a GPU is
    silent: the generator's intended uint64 wrap-around, and the overflow of iterates that
    diverge (detected at the next checkpoint). Silenced there; a no-op on a GPU."""
    if not _SIMULATOR:
        yield
        return
    # The simulated generator calls numba.cuda.random's CPU-jitted functions with the
    # simulator's fake arrays; numba formats (and discards) a typing message each time, from
    # several simulated threads at once, and its colorama init/deinit pairs then race and
    # leave sys.stdout / sys.stderr wrapped once more per launch (after a few hundred runs
    # printing hits Python's recursion limit). Restore the streams afterwards.
    streams = sys.stdout, sys.stderr
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*(overflow|invalid value|divide by zero) "
                                    r"encountered", RuntimeWarning)
            yield
    finally:
        sys.stdout, sys.stderr = streams


# ---------------------------------------------------------------------------------------
# Samplers and oracles
# ---------------------------------------------------------------------------------------
def _device_arange(n, start=0):
    idx = cuda.device_array(int(n), dtype=np.int64)
    _launch(_arange_kernel, n, idx, int(start))
    return idx


class _DeviceSampler:
    """One level's minibatches.

    ``n_samples`` None (deterministic objective): no idx, one "sample" per call (the CPU's
    convention). A batch size equal to ``n_samples``: the full batch ``0..n-1`` in order
    (a device arange, never redrawn). Otherwise, ``kind``:

    * "uniform": ``batch_size`` uniform indices with replacement per draw, drawn on the
      device into the int64 array ``idx`` from generator states ``offset .. offset +
      n_states - 1`` of the shared xoroshiro128p state array;
    * "batches": the CPU's fixed minibatches (``mlocore._stochastic._level_sampling`` and
      ``_kernels.stochastic.draw``): batch b is ``perm[b bs : (b + 1) bs]`` (the last one may
      be shorter) of one permutation drawn by ``np_rng`` (the CPU driver's generator) and
      copied to the device once (counted in ``counter``); the batches are visited in an
      order reshuffled every epoch by the host SplitMix64 state ``hrng`` (``bind``), each
      once per epoch. ``order`` and ``pos`` (host arrays) are the sampler's position.
    """

    def __init__(self, obj, role, batch_size, default_batch, kind="uniform", np_rng=None,
                 counter=None):
        n = obj.n_samples
        self.role, self.idx, self.random, self.n_states = role, None, False, 0
        self.sampled = n is not None
        self.kind = "batches"
        if n is None:
            self.n, self.bs, self.subsampled = 1, 1, False
            self.slices = [None]
        else:
            bs = min(default_batch, n) if batch_size is None else batch_size
            if bs > n:
                raise ValueError(f"{role}_batch_size = {bs} exceeds the {role} objective's "
                                 f"n_samples = {n}; expected 1 <= batch size <= n_samples")
            self.n, self.bs, self.subsampled = n, bs, bs < n
            if bs == n:  # the full batch, in order (reproduces the deterministic run)
                self.idx = _device_arange(n)
                self.slices = [self.idx]
            elif kind == "uniform":
                self.kind, self.random = "uniform", True
                self.blocks = dl.grid_for(bs)  # fixed: the generator states are per thread
                self.n_states = self.blocks * _TPB
                self.idx = cuda.device_array(bs, dtype=np.int64)
            else:
                if np_rng is None:
                    np_rng = np.random.default_rng()
                counter = Transfers() if counter is None else counter
                perm = _to_device_int(np_rng.permutation(n), counter)
                self.slices = [perm[s:min(s + bs, n)] for s in range(0, n, bs)]
        self.nb = -(-self.n // self.bs)
        self.order = np.arange(self.nb, dtype=np.int64)
        self.pos = np.array([self.nb], dtype=np.int64)  # position nb: shuffle on first draw
        self.hrng = np.zeros(1, dtype=np.uint64)

    def bind(self, states, offset, hrng=None):
        self.states, self.offset = states, int(offset)
        if hrng is not None:
            self.hrng = hrng

    def draw_batch(self):
        """The next minibatch ``(idx, b)``: idx refilled on the device (uniform; ``b = -1``)
        or the fixed batch b's device slice (None for a deterministic objective)."""
        if self.random:
            with _quiet_simulated_arithmetic():
                _uniform_indices_kernel[self.blocks, _TPB](self.states, self.offset,
                                                           self.idx, self.n)
            return self.idx, -1
        if self.pos[0] >= self.nb:
            if self.nb > 1:
                _sk.shuffle(self.order, self.hrng)
            self.pos[0] = 0
        b = int(self.order[self.pos[0]])
        self.pos[0] += 1
        return self.slices[b], b

    def draw(self):
        """Next minibatch's idx (on the device; None for a deterministic objective)."""
        return self.draw_batch()[0]

    def batch(self, b):
        """Fixed batch b's indices (batches sampler)."""
        return self.slices[b]

    def full_idx(self):
        """All samples in order (None for a deterministic objective)."""
        if not self.sampled:
            return None
        if self.bs == self.n:
            return self.idx
        if getattr(self, "_full", None) is None:
            self._full = _device_arange(self.n)
        return self._full

    def state_arrays(self):
        """The host arrays a rewind saves (the batches' order and position)."""
        return (self.order, self.pos)


class _SampledOracle:
    """Counted, error-wrapped minibatch calls of one objective: ``grad(z, idx, out)`` and
    ``hvp(z, v, idx, out)`` (idx omitted for a deterministic objective). Counts calls and
    samples (the sum of batch sizes) in the CPU's counter layout."""

    def __init__(self, obj, role, counts, bs):
        self.obj, self.role, self.counts, self.bs = obj, role, counts, bs
        self.slot_grad, self.slot_hvp, self.slot_value = \
            (UPPER_GRAD, UPPER_HVP, UPPER_VALUE) if role == "upper" else \
            (LOWER_GRAD, LOWER_HVP, LOWER_VALUE)
        self.sampled = obj.n_samples is not None

    def _call(self, name, fn, vecs, idx, out):
        args = vecs + ((idx,) if self.sampled else ()) + (out,) + tuple(self.obj.args)
        try:
            fn(*args)
        except CallbackError:
            raise
        except Exception as exc:
            raise CallbackError(f"callback {self.role}.{name} raised {type(exc).__name__}: "
                                f"{exc}") from exc

    def _count(self, slot, idx):
        self.counts[slot] += 1
        self.counts[N_COUNTERS + slot] += 1 if idx is None else idx.shape[0]

    def grad(self, z, idx, out):
        self._count(self.slot_grad, idx)
        self._call("grad", self.obj.grad, (z,), idx, out)

    def hvp(self, z, v, idx, out):
        self._count(self.slot_hvp, idx)
        self._call("hvp", self.obj.hvp, (z, v), idx, out)

    def value(self, z, idx):
        """The mean value over idx, a host float (the callback reads it back)."""
        self._count(self.slot_value, idx)
        args = (z,) + ((idx,) if self.sampled else ()) + tuple(self.obj.args)
        try:
            return float(self.obj.value(*args))
        except CallbackError:
            raise
        except Exception as exc:
            raise CallbackError(f"callback {self.role}.value raised {type(exc).__name__}: "
                                f"{exc}") from exc


def _check_sampled(obj, role, z, counter):
    """Check a stochastic objective's callbacks once at z (one counted read-back): finite
    results on the full batch, on one index and on the two halves (and hvp on the full
    batch), and that grad returns the *mean* over idx (the weighted average of the halves'
    gradients must equal the full-batch one). Raises CallbackError; warns when both halves
    give the same nonzero gradient (a callback that ignores idx)."""
    n, dim = obj.n_samples, z.shape[0]
    oracle = _SampledOracle(obj, role, np.zeros(2 * N_COUNTERS, dtype=np.int64), 0)
    half = max(1, n // 2)
    parts = [(_device_arange(half), half), (_device_arange(n - half, half), n - half)] \
        if n >= 2 else []
    outs = []
    for idx, m in [(_device_arange(n), n), (_device_arange(1), 1)] + parts:
        out = dl.empty(dim)
        dl.fill(out, np.nan)  # entries left unwritten are caught too
        try:
            oracle.grad(z, idx, out)
        except CallbackError as exc:
            raise CallbackError(f"{exc} (when called with a batch of {m} indices)") from exc
        outs.append(out)
    sc = dl.Scalars(counter)
    sc.abs_sum(outs[0], 0)
    sc.abs_sum(outs[1], 1)
    if parts:
        tmp = dl.empty(dim)
        _launch(_combine_kernel, dim, tmp, outs[2], half / n, outs[3], (n - half) / n, outs[0])
        sc.abs_sum(tmp, 2)
        sc.abs_sum(outs[2], 3)
        sc.abs_sum(outs[3], 4)
        _launch(_combine_kernel, dim, tmp, outs[2], 1.0, outs[3], 0.0, outs[3])
        sc.abs_sum(tmp, 5)
    if obj.hvp is not None:
        hv = dl.empty(dim)
        dl.fill(hv, np.nan)
        oracle.hvp(z, dl.start_vector(dim), _device_arange(n), hv)
        sc.abs_sum(hv, 6)
    s = sc.read()
    for slot, what in ((0, f"grad on all {n} samples"), (1, "grad on one sample"),
                       (6, f"hvp on all {n} samples")):
        if slot == 6 and obj.hvp is None:
            continue
        if not math.isfinite(s[slot]):
            raise CallbackError(f"callback {role}.{what.split()[0]} wrote non-finite values "
                                f"(NaN or inf, or left entries of out unwritten) for "
                                f"{what.split(' ', 1)[1]} at the initial point; expected "
                                f"finite values in all {dim} entries of out")
    if parts:
        if not (math.isfinite(s[3]) and math.isfinite(s[4])):
            raise CallbackError(f"callback {role}.grad wrote non-finite values for a batch of "
                                f"{half} indices at the initial point")
        scale = s[0] + s[3] + s[4]
        if not s[2] <= 1e-8 * scale + 1e-10 * dim * (1.0 + scale):
            raise CallbackError(
                f"callback {role}.grad is not the mean over the samples in idx: the weighted "
                f"average of its values on the two halves of the samples differs from its "
                f"value on all {n} samples by {s[2]:.3g} (sum of absolute differences). "
                "Stochastic callbacks must write mean_{i in idx} grad phi_i(z) (plus "
                "sample-independent terms) into out")
        if s[5] == 0.0 and s[3] != 0.0:
            warnings.warn(f"callback {role}.grad writes identical values for two disjoint "
                          "halves of the samples: does it use idx? A callback that ignores "
                          "idx makes every stochastic method a full-batch one.",
                          RuntimeWarning, stacklevel=4)


def _create_states(n, seed, counter):
    """``n`` xoroshiro128p generator states from ``seed`` on the device (initialized on the
    host, one counted host -> device copy)."""
    with warnings.catch_warnings():  # numba compiles the host-side initializer noisily
        warnings.simplefilter("ignore")
        with np.errstate(over="ignore"):
            states = create_xoroshiro128p_states(int(n), seed=int(seed))
    counter.h2d += 1
    counter.h2d_bytes += int(n) * xoroshiro128p_dtype.itemsize
    return states


# ---------------------------------------------------------------------------------------
# Rewind after divergence (the CPU's _Rewind on device arrays: device-to-device copies)
# ---------------------------------------------------------------------------------------
def _dcopy(a):
    if isinstance(a, np.ndarray):  # host state (the batches' order, SplitMix64 state)
        return a.copy()
    if a.dtype == xoroshiro128p_dtype:
        b = cuda.device_array(a.shape[0], dtype=xoroshiro128p_dtype)
        _launch(_copy_states_kernel, a.shape[0], a, b)
        return b
    b = cuda.device_array(a.shape, dtype=a.dtype)
    _launch(dl._copy_kernel, a.shape[0], a, b)
    return b


def _dput(dst, src):
    if isinstance(dst, np.ndarray):
        dst[...] = src
    elif dst.dtype == xoroshiro128p_dtype:
        _launch(_copy_states_kernel, dst.shape[0], src, dst)
    else:
        dl.copy(src, dst)


def _rewind_class():
    from .._stochastic import _Rewind

    class _DeviceRewind(_Rewind):
        """:class:`mlocore._stochastic._Rewind` on device arrays; also keeps the host copy
        of x read back at each kept checkpoint (so a rewind needs no transfer)."""

        def __init__(self, arrays):
            super().__init__(arrays)
            self.x_last = self.x_start = None

        def checkpoint(self, k, norm, x_host=None):
            self.last = [_dcopy(a) for a in self.arrays]
            self.x_last = x_host
            if self.start is None:
                self.start, self.x_start = self.last, x_host
            self.norms.append((k, norm))
            self.resumed = False

        def restore(self):
            if self.resumed:
                self.x_last = self.x_start
            return super().restore()

        def _put(self, saved):
            for a, val in zip(self.arrays, saved):
                _dput(a, val)

    return _DeviceRewind


# ---------------------------------------------------------------------------------------
# Default steps (Lipschitz estimates on the device)
# ---------------------------------------------------------------------------------------
class _HyyBatch(dl.DeviceOperator):
    """``p -> H_yy(z; idx) p`` of the lower objective on a fixed batch (or full batch)."""

    def __init__(self, oracle, z, idx, dx):
        super().__init__(None, z.shape[0] - dx, name="lower.hvp")
        self.oracle, self.z, self.idx, self.dx = oracle, z, idx, dx
        self.w = dl.zeros(z.shape[0])
        self.h = dl.empty(z.shape[0])

    def apply(self, p, out):
        self.n_matvec += 1
        dl.copy(p, self.w[self.dx:])
        self.oracle.hvp(self.z, self.w, self.idx, self.h)
        dl.copy(self.h[self.dx:], out)


def _add_transfers(counter, d):
    counter.h2d += d["h2d"]
    counter.d2h += d["d2h"]
    counter.h2d_bytes += d["h2d_bytes"]
    counter.d2h_bytes += d["d2h_bytes"]


def _upper_lipschitz(problem, x, y, counter, iters=15):
    """The CPU ``estimate_lipschitz(..., "upper")`` on the device: power iteration on
    central differences of full-batch hypergradients (``hypergrad(method="cg")``, each with
    its own lower solve); every call's transfers are added to ``counter``."""
    from ._implicit import hypergrad, solve_lower
    full = DeviceBilevelProblem(problem.upper.full_batch(),
                                problem.lower.full_batch(), problem.dims)
    full._checked = True  # the callbacks were checked by the driver
    res = solve_lower(full, x, y, tol=1e-10, output="numpy")
    _add_transfers(counter, res.transfers)
    ys = res.y
    rng = np.random.default_rng(12345)
    u = rng.standard_normal(problem.dx)
    u /= np.linalg.norm(u)
    h = 1e-4 * (1.0 + np.linalg.norm(x))
    lam = 0.0
    for _ in range(iters):
        grads = []
        for sign in (1.0, -1.0):
            r = hypergrad(full, x + sign * h * u, ys, method="cg", tol=1e-10)
            _add_transfers(counter, r.transfers)
            grads.append(r.grad)
        hu = (grads[0] - grads[1]) / (2 * h)
        lam = float(np.linalg.norm(hu))
        if not np.isfinite(lam) or lam == 0.0:
            break
        u = hu / lam
    return max(lam, 1e-12)


# ---------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------
def _step_at(s, k):
    """``s0 (offset / (offset + k))**power``: the CPU kernels' ``step_at``."""
    s0, p, off = s
    if p == 0.0:
        return s0
    return s0 * (off / (off + k)) ** p


def minimize_stochastic(problem, x0, y0, method, *, maxiter=1000, batch_size=None,
                        upper_batch_size=None, sampler=None, step=None, inner_step=None,
                        inner_steps=None, neumann_terms=None, neumann_step=None, seed=None,
                        eval_every=None, tol=None, callback=None, reference=None,
                        backtrack=None, backend=None, output="numpy", **method_options):
    """Stochastic bilevel methods on the device for a :class:`DeviceBilevelProblem`
    (:func:`mlocore.minimize_bilevel` routes device problems here).

    Parameters
    ----------
    problem : DeviceBilevelProblem
        Objectives with ``n_samples`` take minibatch callbacks ``grad(z, idx, out, *args)``,
        ``hvp(z, v, idx, out, *args)`` returning the mean over idx (a deterministic
        objective is one sample). The lower objective must have ``hvp`` (no difference
        products on this path). ``g(x, .)`` strongly convex (ALGORITHMS.md section 1). Its bounds or
        :class:`mlocore.Ball` are applied by a kernel after every upper step, as the CPU
        kernels do; a user ``project`` (a host function) costs a round trip of x per
        iteration (two counted transfers).
    x0, y0 : ndarray or device array
        Host arrays are validated and copied once each (counted); device arrays are used
        as given and never modified.
    method : str, one of DEVICE_STOCHASTIC_METHODS
        ALGORITHMS.md section 4: SOBA (Dagreou et al. 2022; joint single-loop steps on y, v,
        x), SABA (SOBA with SAGA tables on fixed minibatches; option ``memory_init`` "full"
        or "zeros"), StocBiO (Ji, Yang & Liang 2021; T warm-started lower SGD steps, Neumann
        sum of Q terms), BSA and TTSA (randomized Neumann estimator), stochastic AID-BiO (Q
        CG iterations on one minibatch Hessian, warm-started v) and the alternating
        baseline. The kernels of :mod:`mlocore._kernels.stoch_implicit` and
        :mod:`mlocore._kernels.stoch_free`, step for step.
        Also SUSTAIN / MRBO (STORM double momentum), VRBO (SPIDER, full-batch refresh every
        ``period``), STABLE (averaged dense Hessians), Hessian-free (PZOBO; no HVP needed
        when steps are given) and the value-function penalty / primal-dual methods (need the
        lower ``value`` callback): :mod:`mlocore.cuda._stochastic_variance`, with the CPU's
        method options (``momentum``, ``period``, ``tau``, ``directions``, ``rho``, ...).
    maxiter, batch_size, upper_batch_size, step, inner_step, inner_steps, neumann_terms,
    neumann_step, seed, eval_every, tol, callback, reference, backtrack
        As :func:`mlocore._stochastic.minimize_stochastic` (numbers or
        :class:`mlocore.Schedule` for the steps; default steps from Lipschitz estimates
        computed on the device, halved on divergence up to ``backtrack`` times).
    sampler : {"uniform", "batches"}
        Default: the method's (as on the CPU; "batches" for SABA, which needs it).
        "uniform": with replacement, drawn on the device (``numba.cuda.random``, seeded by
        ``seed``). "batches": the CPU's fixed minibatches of one shuffled order, each once per
        epoch in a reshuffled order (the same permutation and orders as the CPU for a seed;
        see the module docstring).
    output : {"numpy", "device"}
        Type of ``res.x`` and ``res.y``.

    Returns
    -------
    scipy.optimize.OptimizeResult
        The CPU driver's fields (``x, y, fun, jac, nit, success, status, message, method,
        seed, oracle_calls, oracle_samples, history, steps, step_reductions, batch_size,
        time, state``) plus ``transfers`` (and ``multiplier`` for "primal-dual").
        ``state["work"]`` (a device array) is v (SOBA, AID), SABA's work array in the CPU
        layout (the host copy unpacks with :func:`mlocore._stochastic_free.saba_tables`) or
        the CPU's work layout of SUSTAIN / MRBO / VRBO / STABLE / penalty / primal-dual;
        empty for the others.
        ``time`` is the time of the device loops (synchronized at each checkpoint).

    Notes
    -----
    Transfers of a run: host -> device x0 and y0 (when given on the host), one copy of
    the generator states (when a level is subsampled uniformly) and one copy of the
    permutation per level subsampled by fixed batches; device -> host one copy per
    checkpoint (x with two scalars, the initial point included) and y at the end (with
    ``output="numpy"``). The first run on a problem also checks each stochastic objective's
    callbacks (one read-back per level, :func:`_check_sampled`); default steps add the
    read-backs of their Lipschitz estimates. Divergence (a non-finite iterate, or
    ``|(x, y)|`` blowing up) is detected at checkpoints; the oracle counts then include the
    work done up to that checkpoint.
    """
    from .._stochastic import (DEFAULT_BATCH, METHODS, STEP_SAFETY, STOCHASTIC_METHODS,
                               _as_schedule, _divergence_detail, _record_checkpoint,
                               _run_summary, _stop_at_checkpoint, parse_run_options)
    from ._implicit import check_problem_backend
    check_problem_backend(problem, backend, "minimize_bilevel (stochastic methods)")
    check_choice("method", method, STOCHASTIC_METHODS)
    if method not in DEVICE_STOCHASTIC_METHODS:
        raise NotImplementedError(
            f"minimize_bilevel: method={method!r} is not implemented for the CUDA backend "
            f"yet; the device stochastic methods are {', '.join(DEVICE_STOCHASTIC_METHODS)} "
            "(or use backend='cpu' with an mlocore.BilevelProblem)")
    dl.check_output(output, "cuda")
    spec = METHODS[method]
    maxiter, T, Q, extra, batch_size, upper_batch_size, sampler, seed, eval_every, \
        backtrack, tol = parse_run_options(
            spec, method, maxiter=maxiter, batch_size=batch_size,
            upper_batch_size=upper_batch_size, sampler=sampler, inner_steps=inner_steps,
            neumann_terms=neumann_terms, neumann_step=neumann_step, seed=seed,
            eval_every=eval_every, tol=tol, callback=callback, reference=reference,
            backtrack=backtrack, method_options=method_options)
    if method == "saba":
        if sampler != "batches":
            raise ValueError(f"SABA needs fixed minibatches (sampler='batches'), got "
                             f"sampler={sampler!r}")
        from .._stochastic_free import _SABA_INIT
        memory_init = check_choice("memory_init", extra["memory_init"], tuple(_SABA_INIT))
    from . import _stochastic_variance as _sv
    if problem.lower.hvp is None:
        if method not in _sv.GRADIENT_ONLY:
            raise ValueError(f"method {method!r} on the CUDA backend needs the lower "
                             "objective's hvp callback (hvp(z, v, idx, out, *args)); got "
                             "DeviceObjective(hvp=None)")
        if step is None or inner_step is None:
            raise ValueError(f"method {method!r} without the lower objective's hvp callback "
                             "needs explicit step and inner_step on the CUDA backend (the "
                             "default steps come from Hessian-vector products)")
    if spec.needs_value and problem.lower.value is None:
        raise ValueError(f"method {method!r} needs the lower objective's value callback")

    dx, dy = problem.dx, problem.dy
    n = dx + dy
    counter = Transfers()
    counts = np.zeros(2 * N_COUNTERS, dtype=np.int64)
    xd = to_device("x0", x0, counter, dx)
    yd = to_device("y0", y0, counter, dy)
    z = dl.empty(n)           # the iterate (x, y), owned by this run
    dl.copy(xd, z[:dx])
    dl.copy(yd, z[dx:])
    if not getattr(problem, "_sample_checked", False):
        for obj, role in ((problem.upper, "upper"), (problem.lower, "lower")):
            if obj.n_samples is None:
                DeviceOracle(obj, role, np.zeros(N_COUNTERS, dtype=np.int64), counter,
                             n).check_at(z)
            else:
                _check_sampled(obj, role, z, counter)
        problem._sample_checked = True
    project = _DeviceProjection(problem, counter)
    if problem.constrained:  # x0 projected first, as on the CPU
        project(z)

    # the CPU driver's generators, in its order: permutations (upper, then lower), then the
    # SplitMix64 state of batch orders and BSA's / TTSA's numbers of terms (on the host)
    seq = np.random.SeedSequence(seed)
    np_rng = np.random.default_rng(seq.spawn(1)[0])
    samp_u = _DeviceSampler(problem.upper, "upper", upper_batch_size, DEFAULT_BATCH,
                            sampler, np_rng, counter)
    samp_l = _DeviceSampler(problem.lower, "lower", batch_size, DEFAULT_BATCH, sampler,
                            np_rng, counter)
    hrng = seq.generate_state(1, np.uint64)
    n_states = samp_u.n_states + samp_l.n_states
    states = _create_states(n_states, seed, counter) if n_states else \
        cuda.device_array(0, dtype=xoroshiro128p_dtype)
    samp_l.bind(states, 0, hrng)
    samp_u.bind(states, samp_l.n_states, hrng)
    upper = _SampledOracle(problem.upper, "upper", counts, samp_u.bs)
    lower = _SampledOracle(problem.lower, "lower", counts, samp_l.bs)
    # the step estimates' products are not the run's work (the CPU does not count them)
    lower_uncounted = _SampledOracle(problem.lower, "lower",
                                     np.zeros(2 * N_COUNTERS, dtype=np.int64), samp_l.bs)

    # default steps: the CPU driver's Lipschitz estimates, on the device
    lips = {}
    host_xy = {}

    def xy_host():
        if not host_xy:
            host_xy["x"] = to_host(z[:dx], counter)
            host_xy["y"] = to_host(z[dx:], counter)
        return host_xy["x"], host_xy["y"]

    def lipschitz(which):
        if which in lips:
            return lips[which]
        if which == "lower_full":
            full = samp_l.full_idx()
            lam, _ = dl.power_iteration_device(_HyyBatch(lower_uncounted, z, full, dx), dy,
                                               POWER_ITERS, counter=counter)
            lips[which] = LIPSCHITZ_SAFETY * lam
        elif which == "lower":
            lips[which] = lipschitz("lower_full")
            if samp_l.subsampled:
                rng = np.random.default_rng([seed, 7919])
                for _ in range(8):  # the CPU's batches (same generator), copied (counted)
                    idx = _to_device_int(rng.integers(0, samp_l.n, samp_l.bs), counter)
                    op = _HyyBatch(lower_uncounted, z, idx, dx)
                    lam, _ = dl.power_iteration_device(op, dy, 20, counter=counter)
                    if np.isfinite(lam):
                        lips[which] = max(lips[which], LIPSCHITZ_SAFETY * lam)
        else:
            x_h, y_h = xy_host()
            lips[which] = _upper_lipschitz(problem, x_h, y_h, counter)
        return lips[which]

    alpha = _as_schedule("step", step, spec.alpha_power,
                         lambda: spec.alpha_safety * STEP_SAFETY / lipschitz("upper"))
    beta = _as_schedule("inner_step", inner_step, spec.beta_power,
                        lambda: spec.beta_safety / lipschitz("lower"))
    eta = check_positive("neumann_step", neumann_step) if neumann_step is not None else \
        (1.0 / lipschitz("lower_full")
         if "neumann_step" in spec.uses or "neumann_terms" in spec.uses else 0.0)
    variance = method in _sv.VARIANCE_DEVICE_METHODS
    if variance:  # the CPU setup: the same option checks, defaults and parameter layout
        from .._stochastic import _Context
        ctx = _Context(problem, None, np.zeros(dy), samp_u.n, samp_l.n, samp_u.bs,
                       samp_l.bs, lipschitz)
        ctx.T, ctx.Q, ctx.eta, ctx.sampler = T, Q, eta, sampler
        work_host, fextra, iextra = spec.setup(ctx, extra)
    # the halvable parameters (the CPU's fpar slots ALPHA0, BETA0, ETA)
    par = [alpha.initial, beta.initial, eta]
    halvable = [i for i, given in ((0, step), (1, inner_step), (2, neumann_step))
                if given is None and par[i] > 0]
    sched = [[alpha.initial, alpha.power, alpha.offset], [beta.initial, beta.power,
                                                          beta.offset]]

    # work vectors (allocations, not transfers)
    gf, gg, h = dl.empty(n), dl.empty(n), dl.empty(n)
    wv = dl.zeros(n)          # (0, v): SOBA's v, StocBiO's Neumann estimate
    v = wv[dx:]
    wp = dl.zeros(n)          # (0, p): StocBiO's Neumann factor
    acc = dl.empty(dy)
    scalars = dl.Scalars(counter)
    buf = dl.empty(dx + 2)

    def beta_at(k):
        return _step_at((par[1],) + tuple(sched[1][1:]), k)

    def alpha_at(k):
        return _step_at((par[0],) + tuple(sched[0][1:]), k)

    def inner_sgd(k):
        """T lower SGD steps on y, a fresh lower batch each (the CPU's ``inner_sgd``)."""
        b = beta_at(k)
        for _ in range(T):
            lower.grad(z, samp_l.draw(), gg)
            _launch(_lower_sgd_kernel, dy, z, gg, dx, b)

    def soba_iteration(k):
        rho = beta_at(k)
        gamma = alpha_at(k)
        idx_l = samp_l.draw()
        idx_u = samp_u.draw()
        lower.grad(z, idx_l, gg)
        lower.hvp(z, wv, idx_l, h)
        upper.grad(z, idx_u, gf)
        _launch(_soba_update_kernel, n, z, v, gg, h, gf, dx, rho, gamma)

    def neumann_iteration(k):
        """StocBiO (Neumann sum, Q - 1 HVPs) or BSA / TTSA (randomized: q HVPs, q uniform
        on {0..Q-1} from the host SplitMix64 stream, drawn after the upper batch as on the
        CPU)."""
        inner_sgd(k)
        upper.grad(z, samp_u.draw(), gf)
        p = wp[dx:]
        dl.copy(gf[dx:], p)
        if method == "stocbio":
            dl.copy(gf[dx:], acc)
            for _ in range(1, Q):
                lower.hvp(z, wp, samp_l.draw(), h)
                _launch(_neumann_factor_kernel, dy, p, acc, h, dx, par[2])
            dl.scale_into(v, par[2], acc)
        else:
            for _ in range(_sk.rand_int(hrng, Q)):
                lower.hvp(z, wp, samp_l.draw(), h)
                _launch(_neumann_step_kernel, dy, p, h, dx, par[2])
            dl.scale_into(v, par[2] * Q, p)
        lower.hvp(z, wv, samp_l.draw(), h)
        _launch(_upper_step_kernel, dx, z, gf, h, alpha_at(k), dx)

    def alternating_iteration(k):
        inner_sgd(k)
        upper.grad(z, samp_u.draw(), gf)
        _launch(_upper_grad_step_kernel, dx, z, gf, alpha_at(k), dx)

    def aid_iteration(k):
        """T lower SGD steps; Q CG iterations on ``H_yy(xi) v = grad_y f`` for one lower batch
        xi from the warm start v; the upper step along ``grad_x f - H_xy(xi) v``. CG's two
        breaks (``r.r == 0``, curvature not > 0) are decided on the device (no read-back):
        the remaining HVPs of the iteration are still called (and counted) but change
        nothing, so the iterates are the CPU's while the counts exceed the CPU's on a
        break."""
        inner_sgd(k)
        upper.grad(z, samp_u.draw(), gf)
        idx_l = samp_l.draw()
        lower.hvp(z, wv, idx_l, h)
        p = wp[dx:]
        _launch(_aid_residual_kernel, dy, r_cg, p, gf, h, dx)
        _launch(_cg_reset_kernel, 1, cg_sc.device)
        cg_sc.dot(r_cg, r_cg, _CG_RR)
        for _ in range(Q):
            lower.hvp(z, wp, idx_l, h)
            cg_sc.dot(p, h[dx:], _CG_PAP)
            _launch(_cg_gate_kernel, 1, cg_sc.device)
            _launch(_cg_update_kernel, dy, v, r_cg, p, h, dx, cg_sc.device)
            cg_sc.dot(r_cg, r_cg, _CG_RRNEW)
            _launch(_cg_direction_kernel, dy, p, r_cg, cg_sc.device)
            _launch(_cg_commit_kernel, 1, cg_sc.device)
        lower.hvp(z, wv, idx_l, h)
        _launch(_upper_step_kernel, dx, z, gf, h, alpha_at(k), dx)

    def saba_init():
        """Before the first iteration (and again after a rewind to the start): the tables
        filled by one pass over all batches at the current point (``memory_init="full"``),
        or left at zero; then the flag ``work[flag]`` is set."""
        if saba_filled[0]:
            return
        if memory_init == "full":
            dl.fill(work[o_ml:o_tl], 0.0)
            for b in range(samp_l.nb):
                idx = samp_l.batch(b)
                lower.grad(z, idx, gg)
                lower.hvp(z, wv, idx, h)
                _launch(_saba_fill_kernel, rl, work, gg, h, gf, dx, dy, 0, o_tl + b * rl,
                        o_ml, _batch_len(idx) / samp_l.n)
            for b in range(samp_u.nb):
                idx = samp_u.batch(b)
                upper.grad(z, idx, gf)
                _launch(_saba_fill_kernel, ru, work, gg, h, gf, dx, dy, 1, o_tu + b * ru,
                        o_mu, _batch_len(idx) / samp_u.n)
        dl.fill(work[o_flag:o_flag + 1], 1.0)
        saba_filled[0] = 1

    def saba_iteration(k):
        rho = beta_at(k)
        gamma = alpha_at(k)
        idx_l, j = samp_l.draw_batch()
        idx_u, i = samp_u.draw_batch()
        lower.grad(z, idx_l, gg)
        lower.hvp(z, wv, idx_l, h)
        upper.grad(z, idx_u, gf)
        fl = _batch_len(idx_l) / samp_l.n
        fu = _batch_len(idx_u) / samp_u.n
        _launch(_saga_kernel, rl + ru, work, gg, h, gf, dx, dy, o_ml, o_tl + j * rl,
                o_tu + i * ru, samp_l.nb * fl, fl, samp_u.nb * fu, fu, d_saga)
        _launch(_saba_step_kernel, n, z, v, d_saga, dx, dy, rho, gamma)

    has_v = method in ("soba", "saba", "aid")
    saved = (z, wv, states, hrng) + samp_u.state_arrays() + samp_l.state_arrays()
    ext = None
    if variance:
        from types import SimpleNamespace
        ext = _sv.build(method, SimpleNamespace(
            z=z, dx=dx, dy=dy, n=n, lower=lower, upper=upper, samp_l=samp_l, samp_u=samp_u,
            hrng=hrng, par=par, alpha_at=alpha_at, beta_at=beta_at, T=T, Q=Q, fextra=fextra,
            iextra=iextra, work_host=work_host, gf=gf, gg=gg, h=h, counter=counter,
            project=project if problem.constrained else None))
        iteration = ext.iteration
        saved = saved + tuple(ext.saved)
    else:
        step_xy = {"soba": soba_iteration, "saba": saba_iteration,
                   "stocbio": neumann_iteration, "bsa": neumann_iteration,
                   "ttsa": neumann_iteration, "aid": aid_iteration,
                   "alternating": alternating_iteration}[method]
        if problem.constrained:
            def iteration(k):  # the upper step is each iteration's last update of x
                step_xy(k)
                project(z)
        else:
            iteration = step_xy
    check_vec = v if has_v else (ext.check if ext is not None else None)
    if method == "aid":
        r_cg = dl.empty(dy)
        cg_sc = dl.Scalars(counter)
    if method == "saba":
        from .._kernels.stoch_free import saba_layout
        o_flag, o_ml, o_mu, o_tl, o_tu, size = saba_layout(dx, dy, samp_l.nb, samp_u.nb)
        rl, ru = 2 * dy + dx, dy + dx
        work = dl.zeros(size)        # the CPU's work layout (v is kept in wv until the end)
        d_saga = dl.empty(rl + ru)
        saba_filled = np.zeros(1, dtype=np.int64)
        saved = saved + (work, saba_filled)

    def read_checkpoint():
        """One counted read-back: x, |(x, y)|^2 and sum |v| (v of SOBA, SABA, AID; the
        method state of the variance-reduced / value-function methods; 0 for StocBiO)."""
        scalars.dot(z, z, dl.S_AUX)
        if check_vec is not None:
            scalars.abs_sum(check_vec, dl.S_AUX2)  # others: the slot stays 0 (zeroed)
        _launch(_pack_kernel, dx + 2, buf, z, dx, scalars.device, dl.S_AUX, dl.S_AUX2)
        out = to_host(buf, counter)
        return out[:dx].copy(), out[dx], out[dx + 1]

    history = {"iteration": [], "time": [], "oracle_calls": [], "samples": []}
    elapsed = 0.0
    status, k, detail = 20, 0, ""
    current_ref = {}
    x_host = None

    def checkpoint():
        nonlocal current_ref
        current_ref = _record_checkpoint(history, k, elapsed, counts, reference, x_host,
                                         problem)

    rewind = _rewind_class()(saved)
    x_host, zz, _ = read_checkpoint()
    checkpoint()
    rewind.checkpoint(0, math.sqrt(zz), x_host)
    while k < maxiter:
        m = min(eval_every, maxiter - k)
        t0 = time.perf_counter()
        with _quiet_simulated_arithmetic():
            if method == "saba" and m > 0:
                saba_init()
            for it in range(m):
                iteration(k + it)
            cuda.synchronize()
            elapsed += time.perf_counter() - t0
            x_new, zz, vsum = read_checkpoint()
        with np.errstate(invalid="ignore"):
            nz = math.sqrt(zz) if zz >= 0 else math.nan
        nonfinite = not (math.isfinite(zz) and math.isfinite(vsum)) or \
            (ext is not None and not ext.host_ok())
        if nonfinite or rewind.blown_up(nz, k + m):
            what = (f"a non-finite iterate (or |(x, y)|^2 overflowing) by iteration {k + m}"
                    if nonfinite else f"|(x, y)| grew to {nz:.3g} by iteration {k + m}")
            if rewind.reductions < backtrack and halvable:
                for i in halvable:
                    par[i] *= 0.5
                k = rewind.restore()
                x_host = rewind.x_last
                for val in history.values():
                    del val[rewind.n_checkpoints:]
                continue
            rewind.restore_last()
            x_host = rewind.x_last
            status = 13
            detail = _divergence_detail(what, rewind.reductions, halvable, k, par[0], par[1])
            break
        k += m
        x_host = x_new
        rewind.checkpoint(k, nz, x_host)
        checkpoint()
        stop = _stop_at_checkpoint(current_ref, tol, callback, k, elapsed,
                                   lambda: (x_host.copy(), _dcopy(z[dx:])))
        if stop is not None:
            status = stop
            break
    reductions = rewind.reductions
    status, detail, calls, samples, hist = _run_summary(status, detail, tol, reductions,
                                                        counts, history)
    if output == "numpy":
        x_out, y_out = x_host, to_host(z[dx:], counter)
    else:
        x_out, y_out = dl.empty(dx), dl.empty(dy)
        dl.copy(z[:dx], x_out)
        dl.copy(z[dx:], y_out)
    if method == "saba":
        dl.copy(v, work[:dy])  # the CPU layout: v first (mlocore.saba_tables unpacks it)
        state_work = work
    elif ext is not None:
        state_work = ext.state_work()
    else:
        state_work = v if has_v else np.zeros(0)
    return OptimizeResult(
        x=x_out, y=y_out, fun=current_ref.get("F", np.nan), jac=current_ref.get("_grad"),
        nit=k, success=status in (0, 20), status=status,
        message=status_message(status, detail), method=method, seed=seed,
        oracle_calls=calls, oracle_samples=samples, history=hist,
        steps={"alpha": dataclasses.replace(alpha, initial=float(par[0])),
               "beta": dataclasses.replace(beta, initial=float(par[1])),
               "neumann_step": float(par[2])},
        step_reductions=reductions, **({} if ext is None else ext.result()),
        batch_size=(samp_u.bs, samp_l.bs), time=elapsed,
        state={"work": state_work},
        transfers=counter.as_dict())


def _batch_len(idx):
    return 1 if idx is None else idx.shape[0]


def _to_device_int(a, counter):
    """An int64 host array on the device (one counted copy)."""
    arr = np.ascontiguousarray(a, dtype=np.int64)
    counter.h2d += 1
    counter.h2d_bytes += arr.nbytes
    return cuda.to_device(arr)
