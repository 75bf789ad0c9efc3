"""Device building blocks of the stochastic methods ("one large problem" mode) and the
device run of the shared driver (:mod:`mlocore.stochastic._driver`): samplers, device
random numbers, counted minibatch oracles, projections, the rewind on device arrays, the
Lipschitz estimates of the default steps and the kernels several methods share. Each
method's own device loop (a :class:`DeviceMethod`) and kernels are in its module.

A run on a :class:`~mlocore.cuda.DeviceBilevelProblem` has the CPU run's options, default
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

The stochastic device methods call the joint callbacks only: block oracles of a
:class:`~mlocore.cuda.DeviceObjective` (``grad_y``, ``hvp_yy``, ...) are checked once, like
the joint ones, and otherwise not used here.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings

import numpy as np
from numba import cuda

with warnings.catch_warnings():  # under the simulator numba.cuda.random's host-side jit
    warnings.simplefilter("ignore")  # decorators warn (nopython=False) at import
    from numba.cuda import random as _random

from .._callbacks import CallbackError
from .._config import LIPSCHITZ_SAFETY, POWER_ITERS
from .._kernels.oracles import N_COUNTERS
from .._problem import Ball
from ..cuda import _device as _cdevice
from ..cuda import _linalg as dl
from ..cuda import _problem as _cproblem
from ..cuda._implicit import hypergrad, solve_lower
from . import _sampling as _sk
from ._sampling import (INV_2_53, U64_GOLDEN, U64_M1, U64_M2, U64_S11, U64_S27,
                        U64_S30, U64_S31)
from ._spec import Context, Rewind, power_on_differences, step_at

__all__ = ["DeviceRun", "DeviceMethod", "launch", "cuda", "dl"]


_ONE = np.uint64(1)
GOLDEN_INT = 0x9E3779B97F4A7C15
_TWO_PI = 2.0 * math.pi


def threads_per_block():
    return dl.THREADS_PER_BLOCK


def launch(kernel, n, *args):
    """``kernel[blocks, threads](*args)`` with a grid covering n entries."""
    kernel[dl.grid_for(n), dl.THREADS_PER_BLOCK](*args)


def check_output(output):
    dl.check_output(output, "cuda")


# ---------------------------------------------------------------------------------------
# Kernels shared by several methods (float64 vectors, int64 indices; no allocation)
# ---------------------------------------------------------------------------------------
@cuda.jit
def _uniform_indices_kernel(states, offset, idx, n):
    """``idx[i]`` uniform on {0, .., n-1} (with replacement); thread t uses generator state
    ``offset + t`` (grid-stride loop: a thread may draw several indices)."""
    t = cuda.grid(1)
    for i in range(t, idx.shape[0], cuda.gridsize(1)):
        u = _random.xoroshiro128p_uniform_float64(states, offset + t)
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
def lower_sgd_kernel(z, g, dx, beta):
    """``y <- y - beta grad_y g`` (the y block of z and of the joint gradient g)."""
    for i in range(dx + cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        z[i] -= beta * g[i]


@cuda.jit
def neumann_factor_kernel(p, acc, h, dx, eta):
    """One factor of StocBiO's Neumann sum: ``p <- p - eta H_yy p``; ``acc <- acc + p``."""
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i] -= eta * h[dx + i]
        acc[i] += p[i]


@cuda.jit
def upper_step_kernel(z, gf, h, alpha, dx):
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
def neumann_step_kernel(p, h, dx, eta):
    """One factor of the randomized Neumann estimator: ``p <- p - eta H_yy p``."""
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i] -= eta * h[dx + i]



# device counterpart of the CPU's SplitMix64 normals ---------------------------------
@cuda.jit(device=True)
def _splitmix_mix(z):
    z = (z ^ (z >> U64_S30)) * U64_M1
    z = (z ^ (z >> U64_S27)) * U64_M2
    return z ^ (z >> U64_S31)


@cuda.jit
def normals_kernel(out, s0):
    """``out[m]``: the m-th standard normal of the CPU's ``rand_normal`` stream from the
    SplitMix64 state s0 (Box-Muller on draws 2m + 1 and 2m + 2: ``u = 1 - U``, ``v = U``,
    ``sqrt(-2 log u) cos(2 pi v)``)."""
    for m in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        k = np.uint64(2 * m + 1)
        a = _splitmix_mix(s0 + k * U64_GOLDEN)
        b = _splitmix_mix(s0 + (k + _ONE) * U64_GOLDEN)
        u = 1.0 - float(a >> U64_S11) * INV_2_53
        v = float(b >> U64_S11) * INV_2_53
        out[m] = math.sqrt(-2.0 * math.log(u)) * math.cos(_TWO_PI * v)



# two-point estimates (SUSTAIN, MRBO, VRBO) --------------------------------------------
@cuda.jit
def _pair_start_kernel(p1, s1, gf1, p0, s0, gf0, dx, two):
    """Neumann recursions' start at both points: ``p = s = grad_y f`` (the y blocks)."""
    for i in range(cuda.grid(1), p1.shape[0], cuda.gridsize(1)):
        a = gf1[dx + i]
        p1[i] = a
        s1[i] = a
        if two != 0:
            b = gf0[dx + i]
            p0[i] = b
            s0[i] = b


@cuda.jit
def _hyper_kernel(f, gf, h):
    """``f = grad_x f - H_xy v`` (the x blocks of gf and of the cross product h)."""
    for i in range(cuda.grid(1), f.shape[0], cuda.gridsize(1)):
        f[i] = gf[i] - h[i]


@cuda.jit
def _estimate_kernel(work, o_hg, o_hf, gg1, gg0, f1, f0, dx, dy, mode, wg, wf):
    """The estimates ``h_g`` (``work[o_hg:o_hg + dy]``) and ``h_f`` (``work[o_hf:o_hf +
    dx]``) from the lower gradients gg1 / gg0 (joint vectors at the current / previous
    point) and the hypergradient estimates f1 / f0: mode 0 ``h = new``; mode 1 (STORM)
    ``h = new + w (h - old)``; mode 2 (SPIDER) ``h += new - old``."""
    for t in range(cuda.grid(1), dy + dx, cuda.gridsize(1)):
        if t < dy:
            new = gg1[dx + t]
            old = gg0[dx + t]
            o = o_hg + t
            w = wg
        else:
            new = f1[t - dy]
            old = f0[t - dy]
            o = o_hf + t - dy
            w = wf
        if mode == 0:
            work[o] = new
        elif mode == 1:
            work[o] = new + w * (work[o] - old)
        else:
            work[o] += new - old


@cuda.jit
def _estimate_step_kernel(z, work, o_hg, o_hf, o_zp, dx, alpha, beta):
    """Remember z as the previous point (``work[o_zp:]``), then ``x -= alpha h_f`` and
    ``y -= beta h_g``."""
    for i in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        work[o_zp + i] = z[i]
        if i < dx:
            z[i] -= alpha * work[o_hf + i]
        else:
            z[i] -= beta * work[o_hg + i - dx]


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
        self.problem, self.counter, self.dx = problem, counter, problem.dx
        user = problem._project
        self.mode = 0
        if isinstance(user, Ball):
            self.mode = 2
            self.center = _cdevice.to_device("Ball center", user.center_for(self.dx), counter,
                                    self.dx)
            self.radius = float(user.radius)
            self.scratch = dl.empty(1)
        elif user is not None:
            self.mode = 3
        elif problem.lb is not None:
            self.mode = 1
            self.lb = _cdevice.to_device("lower bounds", problem.lb, counter, self.dx)
            self.ub = _cdevice.to_device("upper bounds", problem.ub, counter, self.dx)

    def __call__(self, z):
        if self.mode == 1:
            launch(_clip_kernel, self.dx, z, self.lb, self.ub)
        elif self.mode == 2:
            _ball_kernel[1, threads_per_block()](z, self.center, self.radius, self.scratch)
        elif self.mode == 3:
            x = self.problem.project(_cdevice.to_host(z[:self.dx], self.counter))
            dl.copy(_cdevice.to_device("project(x)", x, self.counter, self.dx), z[:self.dx])


# stochastic AID-BiO: CG on one minibatch Hessian, breaks decided on the device -----------
@contextlib.contextmanager
def _quiet_simulated_arithmetic():
    """Under numba's simulator kernels run on NumPy scalars, which warn where a GPU is
    silent: the generator's intended uint64 wrap-around, and the overflow of iterates that
    diverge (detected at the next checkpoint). Silenced there; a no-op on a GPU."""
    if not _cdevice.simulator_enabled():
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
    launch(_arange_kernel, n, idx, int(start))
    return idx


class _DeviceSampler:
    """One level's minibatches.

    ``n_samples`` None (deterministic objective): no idx, one "sample" per call (the CPU's
    convention). A batch size equal to ``n_samples``: the full batch ``0..n-1`` in order
    (a device arange, never redrawn). Otherwise, ``kind``:

    * "uniform": ``batch_size`` uniform indices with replacement per draw, drawn on the
      device into the int64 array ``idx`` from generator states ``offset .. offset +
      n_states - 1`` of the shared xoroshiro128p state array;
    * "batches": the CPU's fixed minibatches (``_driver._level_sampling`` and
      ``_sampling.draw``): batch b is ``perm[b bs : (b + 1) bs]`` (the last one may
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
                self.n_states = self.blocks * threads_per_block()
                self.idx = cuda.device_array(bs, dtype=np.int64)
            else:
                if np_rng is None:
                    np_rng = np.random.default_rng()
                counter = _cdevice.Transfers() if counter is None else counter
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
                _uniform_indices_kernel[self.blocks, threads_per_block()](self.states, self.offset,
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
        self.slot_grad, self.slot_hvp, self.slot_value = _cproblem.SLOTS[role]
        self.sampled = obj.n_samples is not None

    def _call(self, name, fn, vecs, idx, out):
        args = vecs + ((idx,) if self.sampled else ()) + (out,) + tuple(self.obj.args)
        _cproblem.call_device_callback(self.role, name, fn, args)

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
        return _cproblem.call_device_callback(
            self.role, "value", lambda *a: float(self.obj.value(*a)), args)


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
        launch(_combine_kernel, dim, tmp, outs[2], half / n, outs[3], (n - half) / n, outs[0])
        sc.abs_sum(tmp, 2)
        sc.abs_sum(outs[2], 3)
        sc.abs_sum(outs[3], 4)
        launch(_combine_kernel, dim, tmp, outs[2], 1.0, outs[3], 0.0, outs[3])
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
            states = _random.create_xoroshiro128p_states(int(n), seed=int(seed))
    counter.h2d += 1
    counter.h2d_bytes += int(n) * _random.xoroshiro128p_dtype.itemsize
    return states


# ---------------------------------------------------------------------------------------
# Rewind after divergence (the CPU's Rewind on device arrays: device-to-device copies)
# ---------------------------------------------------------------------------------------
def _dcopy(a):
    if isinstance(a, np.ndarray):  # host state (the batches' order, SplitMix64 state)
        return a.copy()
    if a.dtype == _random.xoroshiro128p_dtype:
        b = cuda.device_array(a.shape[0], dtype=_random.xoroshiro128p_dtype)
        launch(_copy_states_kernel, a.shape[0], a, b)
        return b
    b = cuda.device_array(a.shape, dtype=a.dtype)
    launch(dl._copy_kernel, a.shape[0], a, b)
    return b


def _dput(dst, src):
    if isinstance(dst, np.ndarray):
        dst[...] = src
    elif dst.dtype == _random.xoroshiro128p_dtype:
        launch(_copy_states_kernel, dst.shape[0], src, dst)
    else:
        dl.copy(src, dst)


class DeviceRewind(Rewind):
    """:class:`~mlocore.stochastic._spec.Rewind` on device arrays (device-to-device copies)
    and host arrays; the host copy of x read back at each kept checkpoint is its ``extra``
    (so a rewind needs no transfer)."""

    _copy = staticmethod(_dcopy)
    _put_one = staticmethod(_dput)


# ---------------------------------------------------------------------------------------
# Default steps (Lipschitz estimates on the device)
# ---------------------------------------------------------------------------------------
def _hyy_batch(oracle, z, idx, dx):
    """The operator ``p -> H_yy(z; idx) p`` of the lower objective on a fixed batch (or the
    full batch), for the power iterations of the default steps."""
    w = dl.zeros(z.shape[0])
    h = dl.empty(z.shape[0])

    def matvec(p, out):
        dl.copy(p, w[dx:])
        oracle.hvp(z, w, idx, h)
        dl.copy(h[dx:], out)

    return dl.DeviceOperator(matvec, z.shape[0] - dx, name="lower.hvp")


def _add_transfers(counter, d):
    counter.h2d += d["h2d"]
    counter.d2h += d["d2h"]
    counter.h2d_bytes += d["h2d_bytes"]
    counter.d2h_bytes += d["d2h_bytes"]


def upper_lipschitz(problem, x, y, counter, iters=15):
    """The CPU ``estimate_lipschitz(..., "upper")`` on the device: power iteration on
    central differences of full-batch hypergradients (``hypergrad(method="cg")``, each with
    its own lower solve); every call's transfers are added to ``counter``."""
    full = _cproblem.DeviceBilevelProblem(problem.upper.full_batch(),
                                          problem.lower.full_batch(), problem.dims)
    full._checked = True  # the callbacks were checked by the driver
    res = solve_lower(full, x, y, tol=1e-10, output="numpy")
    _add_transfers(counter, res.transfers)
    ys = res.y

    def grad(xx):
        r = hypergrad(full, xx, ys, method="cg", tol=1e-10)
        _add_transfers(counter, r.transfers)
        return r.grad

    return power_on_differences(grad, x, iters)


def batch_len(idx):
    return 1 if idx is None else idx.shape[0]


def _to_device_int(a, counter):
    """An int64 host array on the device (one counted copy)."""
    arr = np.ascontiguousarray(a, dtype=np.int64)
    counter.h2d += 1
    counter.h2d_bytes += arr.nbytes
    return cuda.to_device(arr)


# ---------------------------------------------------------------------------------------
# Method loops and the device run
# ---------------------------------------------------------------------------------------
class DeviceMethod:
    """One method's device loop for one run (the CPU kernel step for step, on device
    vectors). ``r`` is the :class:`DeviceRun` (iterate ``z = (x, y)``, sizes, oracles,
    samplers, the host SplitMix64 state ``hrng``, the halvable steps ``par``, the schedules
    ``alpha_at`` / ``beta_at``, T, Q, the setup's ``fextra`` / ``iextra`` / ``work_host``,
    the shared work vectors gf, gg, h, wv = (0, v), wp = (0, p), acc).

    * ``iteration(k)``: one iteration (kernels and callbacks, no read-back except where a
      method notes it), x projected after the upper step;
    * ``prepare()``: before each chunk of iterations (SABA's memory initialisation);
    * ``saved``: the arrays a rewind saves and restores (device state, host flags);
    * ``check``: a device vector whose ``sum |.|`` the checkpoint reads back with
      ``|(x, y)|`` (the method's state: a non-finite entry is a divergence), or None;
    * ``host_ok()``: False once a host-side scalar (the primal-dual multiplier) is not
      finite;
    * ``state_work()`` / ``result()``: ``res.state["work"]`` in the CPU layout and extra
      result fields.
    """

    check = None
    saved = ()

    def __init__(self, r):
        self.r = r

    def prepare(self):
        pass

    def host_ok(self):
        return True

    def state_work(self):
        return np.zeros(0)

    def result(self):
        return {}

    def project(self):
        """``x <- P(x)`` after the upper step (where the CPU kernels project), if
        constrained."""
        if self.r.project is not None:
            self.r.project(self.r.z)

    def inner_sgd(self, k):
        """T lower SGD steps on y, a fresh lower batch each (the CPU's ``inner_sgd``)."""
        r = self.r
        b = r.beta_at(k)
        for _ in range(r.T):
            r.lower.grad(r.z, r.samp_l.draw(), r.gg)
            launch(lower_sgd_kernel, r.dy, r.z, r.gg, r.dx, b)


class DeviceRun:
    """A stochastic run on a :class:`~mlocore.cuda.DeviceBilevelProblem` for the driver
    (:mod:`mlocore.stochastic._driver`).

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

    def __init__(self, spec, method, problem, x0, y0, batch_size, upper_batch_size, sampler,
                 seed, step, inner_step, default_batch, output):
        if problem.lower.hvp is None:
            if not spec.gradient_only:
                raise ValueError(f"method {method!r} on the CUDA backend needs the lower "
                                 "objective's hvp callback (hvp(z, v, idx, out, *args)); got "
                                 "DeviceObjective(hvp=None)")
            if step is None or inner_step is None:
                raise ValueError(f"method {method!r} without the lower objective's hvp "
                                 "callback needs explicit step and inner_step on the CUDA "
                                 "backend (the default steps come from Hessian-vector "
                                 "products)")
        if spec.needs_value and problem.lower.value is None:
            raise ValueError(f"method {method!r} needs the lower objective's value callback")
        self.spec, self.problem, self.output = spec, problem, output
        dx, dy = problem.dx, problem.dy
        n = dx + dy
        self.dx, self.dy, self.n = dx, dy, n
        self.counter = counter = _cdevice.Transfers()
        self.counts = counts = np.zeros(2 * N_COUNTERS, dtype=np.int64)
        xd = _cdevice.to_device("x0", x0, counter, dx)
        yd = _cdevice.to_device("y0", y0, counter, dy)
        self.z = z = dl.empty(n)           # the iterate (x, y), owned by this run
        dl.copy(xd, z[:dx])
        dl.copy(yd, z[dx:])
        if not getattr(problem, "_sample_checked", False):
            for obj, role in ((problem.upper, "upper"), (problem.lower, "lower")):
                if obj.n_samples is None:
                    _cproblem.DeviceOracle(obj, role, np.zeros(N_COUNTERS, dtype=np.int64),
                                           counter, n, dx).check_at(z, dx)
                else:
                    _check_sampled(obj, role, z, counter)
            problem._sample_checked = True
        project = _DeviceProjection(problem, counter)
        if problem.constrained:  # x0 projected first, as on the CPU
            project(z)
        self.project = project if problem.constrained else None

        # the CPU driver's generators, in its order: permutations (upper, then lower), then
        # the SplitMix64 state of batch orders and BSA's / TTSA's numbers of terms (host)
        seq = np.random.SeedSequence(seed)
        np_rng = np.random.default_rng(seq.spawn(1)[0])
        self.samp_u = samp_u = _DeviceSampler(problem.upper, "upper", upper_batch_size,
                                              default_batch, sampler, np_rng, counter)
        self.samp_l = samp_l = _DeviceSampler(problem.lower, "lower", batch_size,
                                              default_batch, sampler, np_rng, counter)
        self.hrng = hrng = seq.generate_state(1, np.uint64)
        n_states = samp_u.n_states + samp_l.n_states
        self.states = _create_states(n_states, seed, counter) if n_states else \
            cuda.device_array(0, dtype=_random.xoroshiro128p_dtype)
        samp_l.bind(self.states, 0, hrng)
        samp_u.bind(self.states, samp_l.n_states, hrng)
        self.upper = _SampledOracle(problem.upper, "upper", counts, samp_u.bs)
        self.lower = _SampledOracle(problem.lower, "lower", counts, samp_l.bs)
        # the step estimates' products are not the run's work (the CPU does not count them)
        self._lower_uncounted = _SampledOracle(problem.lower, "lower",
                                               np.zeros(2 * N_COUNTERS, dtype=np.int64),
                                               samp_l.bs)
        self.seed = seed
        self.batch_size = (samp_u.bs, samp_l.bs)
        self._lips = {}
        self._host_xy = {}

    def _xy_host(self):
        if not self._host_xy:
            self._host_xy["x"] = _cdevice.to_host(self.z[:self.dx], self.counter)
            self._host_xy["y"] = _cdevice.to_host(self.z[self.dx:], self.counter)
        return self._host_xy["x"], self._host_xy["y"]

    def lipschitz(self, which):
        """The CPU run's Lipschitz estimates, on the device."""
        lips, counter, samp_l = self._lips, self.counter, self.samp_l
        if which in lips:
            return lips[which]
        if which == "lower_full":
            op = _hyy_batch(self._lower_uncounted, self.z, samp_l.full_idx(), self.dx)
            lam, _ = dl.power_iteration_device(op, self.dy, POWER_ITERS, counter=counter)
            lips[which] = LIPSCHITZ_SAFETY * lam
        elif which == "lower":
            lips[which] = self.lipschitz("lower_full")
            if samp_l.subsampled:
                rng = np.random.default_rng([self.seed, 7919])
                for _ in range(8):  # the CPU's batches (same generator), copied (counted)
                    idx = _to_device_int(rng.integers(0, samp_l.n, samp_l.bs), counter)
                    op = _hyy_batch(self._lower_uncounted, self.z, idx, self.dx)
                    lam, _ = dl.power_iteration_device(op, self.dy, 20, counter=counter)
                    if np.isfinite(lam):
                        lips[which] = max(lips[which], LIPSCHITZ_SAFETY * lam)
        else:
            x_h, y_h = self._xy_host()
            lips[which] = upper_lipschitz(self.problem, x_h, y_h, counter)
        return lips[which]

    def context(self):
        return Context(self.problem, None, np.zeros(self.dy), self.samp_u.n, self.samp_l.n,
                        self.samp_u.bs, self.samp_l.bs, self.lipschitz)

    def build(self, alpha, beta, eta, T, Q, work, fextra, iextra):
        dx, dy, n = self.dx, self.dy, self.n
        self.T, self.Q = T, Q
        self.work_host, self.fextra, self.iextra = work, fextra, iextra
        # the halvable parameters (the CPU's fpar slots ALPHA0, BETA0, ETA)
        self.par = [alpha.initial, beta.initial, eta]
        self._sched = [[alpha.initial, alpha.power, alpha.offset],
                       [beta.initial, beta.power, beta.offset]]
        # work vectors (allocations, not transfers)
        self.gf, self.gg, self.h = dl.empty(n), dl.empty(n), dl.empty(n)
        self.wv = dl.zeros(n)          # (0, v): SOBA's v, StocBiO's Neumann estimate
        self.v = self.wv[dx:]
        self.wp = dl.zeros(n)          # (0, p): StocBiO's Neumann factor
        self.acc = dl.empty(dy)
        self._scalars = dl.Scalars(self.counter)
        self._buf = dl.empty(dx + 2)
        self.method = self.spec.device(self)
        self.avg_sum = dl.zeros(n)     # running sum of the averaged iterates (x, y)
        saved = (self.z, self.wv, self.states, self.hrng, self.avg_sum) + \
            self.samp_u.state_arrays() + self.samp_l.state_arrays() + tuple(self.method.saved)
        self.rewind = DeviceRewind(saved)

    def beta_at(self, k):
        return step_at((self.par[1],) + tuple(self._sched[1][1:]), k)

    def alpha_at(self, k):
        return step_at((self.par[0],) + tuple(self._sched[0][1:]), k)

    def _read_checkpoint(self):
        """One counted read-back: x, |(x, y)|^2 and sum |method.check| (0 without one)."""
        scalars, z, dx = self._scalars, self.z, self.dx
        scalars.dot(z, z, dl.S_AUX)
        if self.method.check is not None:
            scalars.abs_sum(self.method.check, dl.S_AUX2)  # others: the slot stays 0
        launch(_pack_kernel, dx + 2, self._buf, z, dx, scalars.device, dl.S_AUX, dl.S_AUX2)
        out = _cdevice.to_host(self._buf, self.counter)
        return out[:dx].copy(), out[dx], out[dx + 1]

    def start(self):
        x_host, zz, _ = self._read_checkpoint()
        return x_host, math.sqrt(zz)

    def advance(self, k, m):
        t0 = time.perf_counter()
        with _quiet_simulated_arithmetic():
            if m > 0:
                self.method.prepare()
            s = self.avg_start
            for it in range(m):
                self.method.iteration(k + it)
                if k + it >= s:  # tail averaging: acc += (x, y) after the iteration
                    dl.axpy_into(self.avg_sum, self.avg_sum, 1.0, self.z)
            cuda.synchronize()
            dt = time.perf_counter() - t0
            x_new, zz, vsum = self._read_checkpoint()
        with np.errstate(invalid="ignore"):
            nz = math.sqrt(zz) if zz >= 0 else math.nan
        nonfinite = not (math.isfinite(zz) and math.isfinite(vsum)) or \
            not self.method.host_ok()
        failed = (f"a non-finite iterate (or |(x, y)|^2 overflowing) by iteration {k + m}"
                  if nonfinite else None)
        return dt, failed, nz, x_new

    def halve(self, which):
        for i in which:
            self.par[i] *= 0.5

    def steps(self):
        return tuple(float(p) for p in self.par)

    def xy_copies(self, x_host):
        return x_host.copy(), _dcopy(self.z[self.dx:])

    def averaged(self, k):
        """``(x, y, x_host)``: the mean of the iterates after iterations ``avg_start .. k -
        1`` in the output's type and a host copy of x (one counted transfer of (x, y)), or
        None before the window."""
        m = k - self.avg_start
        if m <= 0:
            return None
        out = dl.empty(self.n)
        dl.scale_into(out, 1.0 / m, self.avg_sum)
        host = _cdevice.to_host(out, self.counter)
        x_host = host[:self.dx].copy()
        if self.output == "numpy":
            return x_host, host[self.dx:].copy(), x_host
        return out[:self.dx], out[self.dx:], x_host

    def finish(self, x_host):
        dx, dy, z = self.dx, self.dy, self.z
        if self.output == "numpy":
            x_out, y_out = x_host, _cdevice.to_host(z[dx:], self.counter)
        else:
            x_out, y_out = dl.empty(dx), dl.empty(dy)
            dl.copy(z[:dx], x_out)
            dl.copy(z[dx:], y_out)
        state_work = self.method.state_work()
        return x_out, y_out, self.method.result(), state_work, \
            {"transfers": self.counter.as_dict()}


class DeviceEstimates(DeviceMethod):
    """The two-point estimates of SUSTAIN / MRBO (STORM momentum, ``work = [started, h_g,
    h_f, x_prev, y_prev]``, ``offset = 1``) and VRBO (SPIDER, ``work = [h_g, h_f, x_prev,
    y_prev]``, ``offset = 0``): the CPU ``neumann_pair`` / ``lower_grad_pair`` and
    ``steps_from_estimates`` on device vectors. (x_prev, y_prev) is the joint previous
    point, a view of work."""

    offset = 0
    randomized = False

    def __init__(self, r):
        super().__init__(r)
        dx, dy, n = r.dx, r.dy, r.n
        off = self.offset
        self.work = dl.zeros(off + 2 * dy + 2 * dx)
        self.o_hg, self.o_hf, self.o_zp = off, off + dy, off + dy + dx
        self.zp = self.work[self.o_zp:]
        self.started = np.zeros(1, dtype=np.int64)
        self.gg0, self.gf0, self.h = dl.empty(n), dl.empty(n), r.h
        self.w1, self.w0 = dl.zeros(n), dl.zeros(n)      # (0, p) at both points
        self.u1, self.u0 = dl.zeros(n), dl.zeros(n)      # (0, v) at both points
        self.s1, self.s0 = dl.empty(dy), dl.empty(dy)
        self.f1, self.f0 = dl.empty(dx), dl.empty(dx)
        self.check = self.work
        self.saved = (self.work, self.started)

    def _neumann_pair(self, zc, two, full):
        """The CPU ``neumann_pair``: ``f1`` (at zc) and, if two, ``f0`` (at the previous
        point), every minibatch drawn once and used at both points."""
        r = self.r
        dx, dy, Q = r.dx, r.dy, r.Q
        zp = self.zp
        idx_u = r.samp_u.full_idx() if full else r.samp_u.draw()
        r.upper.grad(zc, idx_u, r.gf)
        if two:
            r.upper.grad(zp, idx_u, self.gf0)
        p1, p0 = self.w1[dx:], self.w0[dx:]
        launch(_pair_start_kernel, dy, p1, self.s1, r.gf, p0, self.s0, self.gf0, dx,
               1 if two else 0)
        eta = r.par[2]
        nq = _sk.rand_int(r.hrng, Q) if self.randomized else Q - 1
        for _ in range(nq):
            idx = r.samp_l.full_idx() if full else r.samp_l.draw()
            r.lower.hvp(zc, self.w1, idx, self.h)
            launch(neumann_factor_kernel, dy, p1, self.s1, self.h, dx, eta)
            if two:
                r.lower.hvp(zp, self.w0, idx, self.h)
                launch(neumann_factor_kernel, dy, p0, self.s0, self.h, dx, eta)
        v1, v0 = self.u1[dx:], self.u0[dx:]
        if self.randomized:
            dl.scale_into(v1, eta * Q, p1)
            if two:
                dl.scale_into(v0, eta * Q, p0)
        else:
            dl.scale_into(v1, eta, self.s1)
            if two:
                dl.scale_into(v0, eta, self.s0)
        idx_l = r.samp_l.full_idx() if full else r.samp_l.draw()
        r.lower.hvp(zc, self.u1, idx_l, self.h)
        launch(_hyper_kernel, dx, self.f1, r.gf, self.h)
        if two:
            r.lower.hvp(zp, self.u0, idx_l, self.h)
            launch(_hyper_kernel, dx, self.f0, self.gf0, self.h)

    def new_estimates(self, idx, two, full):
        """Lower gradients on batch idx and the Neumann hypergradient estimates, at the
        current point and (if two) at the previous one."""
        r = self.r
        r.lower.grad(r.z, idx, r.gg)
        if two:
            r.lower.grad(self.zp, idx, self.gg0)
        self._neumann_pair(r.z, two, full)

    def update(self, mode, wg=0.0, wf=0.0):
        """``h = new`` (mode 0), STORM ``h = new + w (h - old)`` (1), SPIDER ``h += new -
        old`` (2)."""
        r = self.r
        launch(_estimate_kernel, r.dy + r.dx, self.work, self.o_hg, self.o_hf, r.gg,
               self.gg0, self.f1, self.f0, r.dx, r.dy, mode, wg, wf)

    def step(self, k):
        """Remember the point, ``y -= beta_k h_g``, ``x <- P(x - alpha_k h_f)``."""
        r = self.r
        launch(_estimate_step_kernel, r.n, r.z, self.work, self.o_hg, self.o_hf, self.o_zp,
               r.dx, r.alpha_at(k), r.beta_at(k))
        self.project()

    def state_work(self):
        return self.work


def full_upper_F(problem, x, y):
    """``F(x) = f(x, y*(x))`` on the full batches, a host float: y*(x) from a full-batch
    lower solve warm-started at y, then the upper value callback on all samples (the score
    of a ``step="auto"`` trial; its transfers are not a run's)."""
    full = _cproblem.DeviceBilevelProblem(problem.upper.full_batch(),
                                          problem.lower.full_batch(), problem.dims)
    full._checked = True
    method = "newton-cg" if problem.lower.hvp is not None else "agd"
    ys = solve_lower(full, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64),
                     method=method, tol=1e-8, output="numpy").y
    obj = problem.upper
    z = cuda.to_device(np.concatenate([np.asarray(x, dtype=np.float64), ys]))
    args = (z,)
    if obj.n_samples is not None:
        args += (_device_arange(obj.n_samples),)
    return _cproblem.call_device_callback("upper", "value", lambda *a: float(obj.value(*a)),
                                          args + tuple(obj.args))
