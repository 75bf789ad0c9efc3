"""Stochastic bilevel methods: one module per method (its update equations and paper, its
:class:`~mlocore.stochastic._spec.MethodSpec`, its CPU ``@njit`` loop and its CUDA
kernels), one driver for both backends (:mod:`~mlocore.stochastic._driver`), and the shared
building blocks (:mod:`~mlocore.stochastic._sampling` on the CPU,
:mod:`~mlocore.stochastic._device` on the device).

:data:`METHODS` is the static registry: method name -> specification.
"""
import os

from .._kernels import guard_cache, kernel_sources
from . import (aid, alternating, bsa, hessian_free, mrbo, penalty, primal_dual, saba, soba,
               stable, stocbio, sustain, ttsa, vrbo)
from ._driver import estimate_lipschitz, minimize
from ._spec import MethodSpec, Schedule
from .primal_dual import MULTIPLIER_INDEX
from .saba import saba_tables

__all__ = ["Schedule", "MethodSpec", "METHODS", "STOCHASTIC_METHODS",
           "DEVICE_STOCHASTIC_METHODS", "minimize_stochastic", "minimize_device",
           "estimate_lipschitz", "saba_tables", "MULTIPLIER_INDEX"]

#: method name -> specification (the order of ``minimize_bilevel``'s documentation)
METHODS = {
    "alternating": alternating.SPEC,
    "bsa": bsa.SPEC,
    "stocbio": stocbio.SPEC,
    "aid": aid.SPEC,
    "ttsa": ttsa.SPEC,
    "soba": soba.SPEC,
    "stable": stable.SPEC,
    "sustain": sustain.SPEC,
    "mrbo": mrbo.SPEC,
    "vrbo": vrbo.SPEC,
    "saba": saba.SPEC,
    "hessian-free": hessian_free.SPEC,
    "penalty": penalty.SPEC,
    "primal-dual": primal_dual.SPEC,
}
STOCHASTIC_METHODS = tuple(METHODS)

# the method kernels inline the building blocks of _sampling.py (and constants of
# mlocore._kernels and _config), which numba's cache does not track: clear this package's
# cache when any of them changed (before any kernel is loaded: numba loads at first call)
guard_cache(os.path.dirname(os.path.abspath(__file__)), kernel_sources())
#: the methods with a device loop (every one)
DEVICE_STOCHASTIC_METHODS = ("soba", "saba", "stocbio", "bsa", "ttsa", "aid", "alternating",
                             "sustain", "mrbo", "vrbo", "stable", "hessian-free", "penalty",
                             "primal-dual")


def minimize_stochastic(problem, x0, y0, method, **options):
    """Driver of the stochastic methods; see :func:`mlocore.minimize_bilevel`. A device
    problem (or ``backend="cuda"``) runs on the device (:func:`minimize_device`)."""
    return minimize(METHODS, False, problem, x0, y0, method, **options)


def minimize_device(problem, x0, y0, method, *, maxiter=1000, batch_size=None,
                    upper_batch_size=None, sampler=None, step=None, inner_step=None,
                    inner_steps=None, neumann_terms=None, neumann_step=None, seed=None,
                    eval_every=None, tol=None, callback=None, reference=None,
                    backtrack=None, backend=None, output="numpy", average=None,
                    **method_options):
    """Stochastic bilevel methods on the device for a :class:`~mlocore.cuda.DeviceBilevelProblem`
    (:func:`mlocore.minimize_bilevel` routes device problems here).

    Parameters
    ----------
    problem : DeviceBilevelProblem
        Objectives with ``n_samples`` take minibatch callbacks ``grad(z, idx, out, *args)``,
        ``hvp(z, v, idx, out, *args)`` returning the mean over idx (a deterministic
        objective is one sample). The lower objective must have ``hvp`` (no difference
        products on this path) except for "hessian-free", "penalty" and "primal-dual" with
        given steps. ``g(x, .)`` strongly convex. Its bounds or :class:`mlocore.Ball` are
        applied by a kernel after every upper step, as the CPU kernels do; a user
        ``project`` (a host function) costs a round trip of x per iteration (two counted
        transfers).
    x0, y0 : ndarray or device array
        Host arrays are validated and copied once each (counted); device arrays are used
        as given and never modified.
    method : str, one of DEVICE_STOCHASTIC_METHODS
        The CPU methods (see :data:`METHODS` and each method's module), step for step,
        with the CPU's method options (``memory_init``, ``momentum``, ``period``, ``tau``,
        ``directions``, ``rho``, ...).
    maxiter, batch_size, upper_batch_size, step, inner_step, inner_steps, neumann_terms,
    neumann_step, seed, eval_every, tol, callback, reference, backtrack
        As on the CPU (numbers or :class:`mlocore.Schedule` for the steps, or
        ``step="auto"``, the counted step search; default steps from Lipschitz estimates
        computed on the device, halved on divergence up to ``backtrack`` times).
    average : float or bool, optional
        Tail averaging as on the CPU (an accumulator on the device, one kernel per averaged
        iteration; the mean is read back once, a counted transfer).
    sampler : {"uniform", "batches"}
        Default: the method's (as on the CPU; "batches" for SABA, which needs it).
        "uniform": with replacement, drawn on the device (``numba.cuda.random``, seeded by
        ``seed``). "batches": the CPU's fixed minibatches of one shuffled order, each once
        per epoch in a reshuffled order (the same permutation and orders as the CPU for a
        seed; see :mod:`mlocore.stochastic._device`).
    output : {"numpy", "device"}
        Type of ``res.x`` and ``res.y``.

    Returns
    -------
    scipy.optimize.OptimizeResult
        The CPU driver's fields (``x, y, fun, jac, nit, success, status, message, method,
        seed, oracle_calls, oracle_samples, history, steps, step_reductions, batch_size,
        time, state, x_last, y_last, average``, ``step_search`` with ``step="auto"``) plus
        ``transfers`` (and ``multiplier`` for "primal-dual").
        ``state["work"]`` (a device array) is v (SOBA, AID), SABA's work array in the CPU
        layout (the host copy unpacks with :func:`saba_tables`) or the CPU's work layout of
        SUSTAIN / MRBO / VRBO / STABLE / penalty / primal-dual; empty for the others.
        ``time`` is the time of the device loops (synchronized at each checkpoint).
    """
    return minimize(METHODS, True, problem, x0, y0, method, maxiter=maxiter, batch_size=batch_size,
                    upper_batch_size=upper_batch_size, sampler=sampler, step=step,
                    inner_step=inner_step, inner_steps=inner_steps,
                    neumann_terms=neumann_terms, neumann_step=neumann_step, seed=seed,
                    eval_every=eval_every, tol=tol, callback=callback, reference=reference,
                    backtrack=backtrack, backend=backend, output=output, average=average,
                    **method_options)
