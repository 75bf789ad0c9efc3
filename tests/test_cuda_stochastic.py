"""CUDA backend, stochastic bilevel loops (SOBA, SABA, StocBiO, BSA, TTSA, AID, alternating;
SUSTAIN, MRBO, VRBO, STABLE, Hessian-free, penalty, primal-dual) on the device, against the
CPU.

Evidence: full-batch runs equal the CPU runs to 1e-10; fixed minibatches
(``sampler="batches"``, whose permutation and batch orders come from the CPU driver's
generators) equal the CPU runs to 1e-12, minibatches included; uniform minibatches (drawn on
the device, streams that differ from the CPU's) are reproducible per seed and converge on
the stochastic quadratic like the CPU's; huge steps give status 13 with finite iterates.
Runs under numba's CUDA simulator (tests/conftest.py): tiny sizes (dx=2, dy=3, n=8).
"""
import math
import sys

import numpy as np
import pytest
from numba import cuda

import mlocore as mlo
from mlocore._callbacks import CallbackError
from mlocore.cuda._device import is_device_array
from mlocore.cuda._problem import DeviceBilevelProblem, DeviceObjective
from mlocore.stochastic import METHODS
from mlocore.stochastic import minimize_device as minimize_stochastic
from mlocore.problems import make_quadratic
from mlocore.problems.cuda_callbacks import quad_grad_device, quad_hvp_device
from mlocore.problems.cuda_stochastic import (quad_sample_grad_device, quad_sample_hvp_device,
                                              quad_sample_value_device,
                                              stochastic_quadratic_device_problem)
from mlocore.problems.quadratic import (quad_grad, quad_hvp, quad_sample_grad,
                                        quad_sample_hvp, quad_sample_value)
from oracle_helpers import joint_stochastic_twin

pytestmark = pytest.mark.cuda

STOCBIO = dict(inner_steps=2, neumann_terms=3, neumann_step=0.3)
METHOD_OPTIONS = {"soba": {}, "stocbio": STOCBIO, "saba": {}, "bsa": STOCBIO,
                  "ttsa": dict(neumann_terms=3, neumann_step=0.3),
                  "aid": dict(inner_steps=2, neumann_terms=2),
                  "alternating": dict(inner_steps=2)}


@pytest.fixture(scope="module", autouse=True)
def fast_simulator_barriers():
    """Shorter GIL switch interval: the simulator's syncthreads polls (restored after)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(scope="module")
def quad():
    # ridge 1: Q's eigenvalues 1.7 and 2.5, so a few dozen iterations converge. The CPU
    # problems give the joint callbacks only, as the device problems do (the same counts)
    return joint_stochastic_twin(make_quadratic(dx=2, dy=3, n_outer=8, n_inner=8, seed=3, ridge=1.0))


@pytest.fixture(scope="module")
def dev(quad):
    return stochastic_quadratic_device_problem(quad)


X0 = np.array([2.0, -2.0])
Y0 = np.array([0.5, 0.0, -0.5])


def _cpu(quad, method, **kw):
    return mlo.minimize_bilevel(quad.stochastic_problem, X0, Y0, method=method,
                                reference=quad, **{**METHOD_OPTIONS[method], **kw})


def _dev(problem, quad, method, x0=X0, y0=Y0, **kw):
    return mlo.minimize_bilevel(problem, x0, y0, method=method, reference=quad,
                                **{**METHOD_OPTIONS[method], **kw})


# ---------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------
def test_sample_callbacks_match_cpu(quad, dev):
    rng = np.random.default_rng(0)
    z, v = rng.standard_normal(5), rng.standard_normal(5)
    v[:2] = 0.0  # the (0, v) directions of the lower products (the CPU's x_p == 0 branch)
    idx = np.array([3, 1, 3, 7], dtype=np.int64)
    zd, vd, idd, out = cuda.to_device(z), cuda.to_device(v), cuda.to_device(idx), \
        cuda.device_array(5)
    for obj, samples in ((dev.lower, quad.lower_samples), (dev.upper, quad.upper_samples)):
        args = samples + (quad.ridge,)
        quad_sample_grad_device(zd, idd, out, *obj.args)
        np.testing.assert_allclose(out.copy_to_host(), quad_sample_grad(z, idx, *args),
                                   rtol=0, atol=1e-12)
        quad_sample_hvp_device(zd, vd, idd, out, *obj.args)
        np.testing.assert_allclose(out.copy_to_host(), quad_sample_hvp(z, v, idx, *args),
                                   rtol=0, atol=1e-12)
        assert quad_sample_value_device(zd, idd, *obj.args) == \
            pytest.approx(quad_sample_value(z, idx, *args), rel=1e-12, abs=1e-12)
    np.testing.assert_array_equal(zd.copy_to_host(), z)
    assert dev.transfers["h2d"] == 10 and dev.upper.n_samples == dev.lower.n_samples == 8
    with pytest.raises(TypeError, match="int64"):
        quad_sample_grad_device(zd, cuda.to_device(idx.astype(np.int32)), out, *dev.lower.args)


# ---------------------------------------------------------------------------------------
# (a) full batch: the CPU run, to 1e-10
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["soba", "stocbio"])
def test_full_batch_matches_cpu_with_exact_transfers(quad, method):
    problem = stochastic_quadratic_device_problem(quad)  # fresh: its first run checks
    x0, y0 = X0.copy(), Y0.copy()
    kw = dict(batch_size=8, step=0.2, inner_step=0.3, maxiter=12, eval_every=4, seed=5)
    r = _dev(problem, quad, method, x0=x0, y0=y0, **kw)
    c = _cpu(quad, method, **kw)
    assert r.status == c.status == 20 and r.nit == c.nit == 12 and r.method == method
    np.testing.assert_allclose(r.x, c.x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r.y, c.y, rtol=0, atol=1e-10)
    for key in ("iteration", "oracle_calls", "samples"):
        np.testing.assert_array_equal(r.history[key], c.history[key])
    for key in ("dist_to_x_star", "F", "grad_norm_sq"):
        np.testing.assert_allclose(r.history[key], c.history[key], rtol=1e-10, atol=1e-12)
    assert r.fun == pytest.approx(c.fun, rel=1e-10)
    assert r.oracle_calls == c.oracle_calls and r.oracle_samples == c.oracle_samples
    assert r.batch_size == c.batch_size == (8, 8)
    if method == "soba":
        np.testing.assert_allclose(r.state["work"].copy_to_host(), c.state["work"],
                                   rtol=0, atol=1e-10)
    # x0, y0 in; per checkpoint (4, the start included) one read-back; y at the end; the
    # first run on a problem checks each level's callbacks (one read-back each); the tail
    # average (x, y) once
    assert r.transfers["h2d"] == 2
    assert r.transfers["d2h"] == 2 + 4 + 1 + 1
    np.testing.assert_array_equal(x0, X0)
    np.testing.assert_array_equal(y0, Y0)
    r2 = _dev(problem, quad, method, **kw)
    assert r2.transfers == {"h2d": 2, "d2h": 6, "h2d_bytes": 40,
                            "d2h_bytes": 4 * 8 * (2 + 2) + 3 * 8 + 5 * 8}
    np.testing.assert_array_equal(r2.x, r.x)


def test_deterministic_upper_level_and_device_inputs(quad):
    """An upper objective without n_samples (one 'sample' per call, no idx) next to a
    stochastic lower one; x0/y0 given on the device (used, not modified, not copied)."""
    lower = stochastic_quadratic_device_problem(quad).lower
    upper = DeviceObjective(quad_grad_device, hvp=quad_hvp_device, args=quad.upper_means)
    problem = DeviceBilevelProblem(upper, lower, dims=(2, 3))
    cpu = mlo.BilevelProblem(
        upper=mlo.Objective(quad_grad, hvp=quad_hvp, args=quad.upper_means),
        lower=quad.stochastic_problem.lower, dims=(2, 3))
    kw = dict(batch_size=8, step=0.2, inner_step=0.3, maxiter=6, eval_every=3, seed=1)
    xd, yd = cuda.to_device(X0), cuda.to_device(Y0)
    r = minimize_stochastic(problem, xd, yd, "soba", output="device", **kw)
    c = mlo.minimize_bilevel(cpu, X0, Y0, method="soba", **kw)
    assert is_device_array(r.x) and is_device_array(r.y)
    np.testing.assert_allclose(r.x.copy_to_host(), c.x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r.y.copy_to_host(), c.y, rtol=0, atol=1e-10)
    assert r.oracle_samples == c.oracle_samples and r.oracle_samples["upper_grad"] == 6
    # nothing copied in; read-backs: deterministic upper check (grad and hvp), lower check,
    # three checkpoints, and the tail average (x, y) for fun; outputs stay on the device
    assert r.transfers["h2d"] == 0 and r.transfers["d2h"] == 2 + 1 + 3 + 1
    np.testing.assert_array_equal(xd.copy_to_host(), X0)
    np.testing.assert_array_equal(yd.copy_to_host(), Y0)


def test_default_steps_full_batch_match_cpu(quad, dev):
    """Default steps from the Lipschitz estimates (L_F by hypergradient differences, L_g by
    power iteration), computed on the device: the CPU's steps and iterates."""
    kw = dict(batch_size=8, maxiter=4, eval_every=4, seed=0)
    r = _dev(dev, quad, "stocbio", **{**kw, "neumann_step": None})
    c = _cpu(quad, "stocbio", **{**kw, "neumann_step": None})
    for key in ("alpha", "beta"):
        assert r.steps[key].initial == pytest.approx(c.steps[key].initial, rel=1e-8)
        assert r.steps[key].power == c.steps[key].power
    assert r.steps["neumann_step"] == pytest.approx(c.steps["neumann_step"], rel=1e-8)
    np.testing.assert_allclose(r.x, c.x, rtol=0, atol=1e-8)
    assert r.transfers["d2h"] > 2 + 1  # the estimates' read-backs are counted


# ---------------------------------------------------------------------------------------
# (b) minibatches drawn on the device: reproducible, seeded, convergent
# ---------------------------------------------------------------------------------------
def test_minibatch_reproducible_per_seed_and_chunking(quad, dev):
    kw = dict(batch_size=2, step=0.2, inner_step=0.3, maxiter=8)
    a = _dev(dev, quad, "soba", seed=11, eval_every=8, **kw)
    b = _dev(dev, quad, "soba", seed=11, eval_every=3, **kw)
    c = _dev(dev, quad, "soba", seed=12, eval_every=8, **kw)
    np.testing.assert_array_equal(a.x, b.x)  # the generator states persist across chunks
    np.testing.assert_array_equal(a.y, b.y)
    assert np.abs(a.x - c.x).max() > 1e-6
    assert a.oracle_samples["lower_grad"] == 8 * 2 and a.batch_size == (2, 2)
    # generator states copied in once, x0 and y0; one read-back per checkpoint, y, the
    # tail average (x, y)
    assert a.transfers["h2d"] == 3 and a.transfers["d2h"] == 2 + 1 + 1
    assert b.transfers["d2h"] == 4 + 1 + 1


@pytest.mark.parametrize("method", ["soba", "stocbio"])
def test_minibatch_converges_like_cpu(quad, dev, method):
    """batch 4 of 8, alpha_k = 0.2 / sqrt(1 + k/10), 40 iterations from |x0 - x*| = 3.1: the
    CPU ends within 0.4 of x* for most seeds (median about 0.3 (SOBA) / 0.14 (StocBiO));
    the device's runs must end within 0.7 (and 0.45 on average over two seeds)."""
    kw = dict(batch_size=4, step=mlo.Schedule(0.2, 0.5, 10.0), inner_step=0.3, maxiter=40,
              eval_every=20)
    cpu = [_cpu(quad, method, seed=s, **kw).history["dist_to_x_star"][-1] for s in range(6)]
    devd = [_dev(dev, quad, method, seed=s, **kw).history["dist_to_x_star"] for s in (0, 1)]
    start = devd[0][0]
    assert start == pytest.approx(np.linalg.norm(X0 - quad.x_star))
    finals = [d[-1] for d in devd]
    assert max(finals) < 0.7 and np.mean(finals) < 0.45, (finals, cpu)
    assert np.median(cpu) < 0.4  # the CPU reference the bound is comparable to


# ---------------------------------------------------------------------------------------
# (c) divergence
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["soba", "stocbio"])
def test_huge_steps_diverge_with_status_13(quad, dev, method):
    r = _dev(dev, quad, method, batch_size=2, step=1e3, inner_step=1e3, maxiter=40,
             eval_every=10, seed=0)
    assert r.status == 13 and not r.success and "Diverged" in r.message
    assert r.step_reductions == 0  # explicit steps are never halved
    # the last (finite) checkpoint's iterate; divergence is detected at checkpoints
    assert r.nit < 40 and r.nit == r.history["iteration"][-1]
    assert np.all(np.isfinite(r.x)) and np.all(np.isfinite(r.y))
    assert np.linalg.norm(r.x - quad.x_star) == pytest.approx(r.history["dist_to_x_star"][-1])
    assert r.transfers["d2h"] == len(r.history["iteration"]) + 1 + 1  # + the diverged one


def test_callback_stop_and_history(quad, dev):
    seen = []

    def cb(res):
        seen.append((res.nit, res.x.copy(), is_device_array(res.y), res.dist_to_x_star))
        if res.nit >= 4:
            raise StopIteration

    r = _dev(dev, quad, "soba", batch_size=8, step=0.2, inner_step=0.3, maxiter=20,
             eval_every=2, seed=0, callback=cb)
    assert r.status == 99 and r.nit == 4 and [s[0] for s in seen] == [2, 4]
    assert all(s[2] for s in seen)
    np.testing.assert_array_equal(seen[-1][1], r.x)
    assert list(r.history["iteration"]) == [0, 2, 4]
    assert set(r.history) >= {"time", "oracle_calls", "samples", "F", "grad_norm_sq"}


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def test_bad_input_errors(quad, dev):
    kw = dict(maxiter=1, step=0.1, inner_step=0.1)
    with pytest.raises(ValueError, match="method"):
        minimize_stochastic(dev, X0, Y0, "newton", **kw)
    with pytest.raises(ValueError, match="lower_batch_size = 9 exceeds.*n_samples = 8"):
        minimize_stochastic(dev, X0, Y0, "soba", batch_size=9, upper_batch_size=4, **kw)
    with pytest.raises(ValueError, match=r"SABA needs fixed minibatches \(sampler='batches'\), "
                                         "got sampler='uniform'"):
        minimize_stochastic(dev, X0, Y0, "saba", sampler="uniform", **kw)
    with pytest.raises(ValueError, match="memory_init"):
        minimize_stochastic(dev, X0, Y0, "saba", memory_init="ones", **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tau'.*memory_init"):
        minimize_stochastic(dev, X0, Y0, "saba", tau=0.1, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tau'.*none"):
        minimize_stochastic(dev, X0, Y0, "bsa", tau=0.1, **kw)
    with pytest.raises(ValueError, match="sampler"):
        minimize_stochastic(dev, X0, Y0, "soba", sampler="shuffled", **kw)
    with pytest.raises(TypeError, match="does not use neumann_terms"):
        minimize_stochastic(dev, X0, Y0, "soba", neumann_terms=3, **kw)
    with pytest.raises(ValueError, match=r"x0 must have shape \(2,\), got shape \(3,\)"):
        minimize_stochastic(dev, np.zeros(3), Y0, "soba", **kw)
    with pytest.raises(TypeError, match="DeviceBilevelProblem has device callbacks"):
        minimize_stochastic(dev, X0, Y0, "soba", backend="cpu", **kw)
    with pytest.raises(TypeError, match="needs device callbacks"):
        mlo.minimize_bilevel(quad.stochastic_problem, X0, Y0, method="soba", backend="cuda",
                             **kw)
    with pytest.raises(ValueError, match="n_samples must be None or a positive integer, "
                                         "got 0"):
        DeviceObjective(quad_sample_grad_device, n_samples=0)
    no_hvp = DeviceBilevelProblem(dev.upper, DeviceObjective(
        quad_sample_grad_device, args=dev.lower.args, n_samples=8), dims=(2, 3))
    with pytest.raises(ValueError, match="needs the lower objective's hvp"):
        minimize_stochastic(no_hvp, X0, Y0, "soba", **kw)


def test_sum_instead_of_mean_is_rejected(quad, dev):
    def summed_grad(z, idx, out, *args):
        quad_sample_grad_device(z, idx, out, *args)
        from mlocore.cuda import _linalg as dl
        dl.scale_into(out, float(idx.shape[0]), out)

    bad = DeviceBilevelProblem(dev.upper, DeviceObjective(
        summed_grad, hvp=quad_sample_hvp_device, args=dev.lower.args, n_samples=8),
        dims=(2, 3))
    with pytest.raises(CallbackError, match="lower.grad is not the mean"):
        minimize_stochastic(bad, X0, Y0, "soba", maxiter=1, step=0.1, inner_step=0.1)

    def raising(z, idx, out, *args):
        raise RuntimeError("boom")

    bad = DeviceBilevelProblem(DeviceObjective(raising, args=dev.upper.args, n_samples=8),
                               dev.lower, dims=(2, 3))
    with pytest.raises(CallbackError, match="upper.grad raised RuntimeError: boom"):
        minimize_stochastic(bad, X0, Y0, "soba", maxiter=1, step=0.1, inner_step=0.1)
    assert math.isfinite(quad.F(X0))


def test_backtracking_halves_default_steps_like_cpu(quad, dev, monkeypatch):
    """A far too large default upper step (L_F estimate patched to 1e-3 on both backends):
    each divergence halves it and resumes from a saved state (device-to-device copies),
    exactly as on the CPU: same halvings, same iterates."""
    from mlocore.stochastic import _device as dev_driver
    from mlocore.stochastic import _driver as cpu_driver
    monkeypatch.setattr(cpu_driver, "estimate_lipschitz", lambda *a, **k: 1e-3)
    monkeypatch.setattr(dev_driver, "upper_lipschitz", lambda *a, **k: 1e-3)
    kw = dict(batch_size=8, inner_step=0.3, maxiter=10, eval_every=5, seed=0,
              backtrack=20)
    r = _dev(dev, quad, "soba", **kw)
    c = _cpu(quad, "soba", **kw)
    assert c.step_reductions > 3 and r.step_reductions == c.step_reductions
    assert r.status == c.status == 20 and "halved" in r.message
    assert r.steps["alpha"].initial == c.steps["alpha"].initial
    np.testing.assert_allclose(r.x, c.x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r.y, c.y, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(r.history["iteration"], c.history["iteration"])


def test_rewind_restores_generator_states(dev):
    """Saved and restored generator states replay the same minibatches."""
    from mlocore.stochastic import _device as dd
    from mlocore.cuda._device import Transfers
    samp = dd._DeviceSampler(dev.lower, "lower", 3, 64)
    states = dd._create_states(samp.n_states, 7, Transfers())
    samp.bind(states, 0)
    z = cuda.to_device(np.arange(5.0))
    rewind = dd.DeviceRewind((z, states))
    rewind.checkpoint(0, 1.0, np.zeros(2))
    first = samp.draw().copy_to_host()
    z[:] = -1.0
    second = samp.draw().copy_to_host()
    rewind.checkpoint(5, 1.0, np.ones(2))
    third = samp.draw().copy_to_host()
    assert rewind.restore() == 5 and rewind.extra_last[0] == 1.0
    np.testing.assert_array_equal(samp.draw().copy_to_host(), third)
    assert rewind.restore() == 0 and rewind.extra_last[0] == 0.0  # twice: back to the start
    np.testing.assert_array_equal(z.copy_to_host(), np.arange(5.0))
    np.testing.assert_array_equal(samp.draw().copy_to_host(), first)
    assert not np.array_equal(first, second) and first.min() >= 0 and first.max() < 8


def test_deterministic_solvers_use_the_full_batch(quad, dev):
    """hypergrad / solve_lower on finite-sum device objectives run on the full batch, as the
    CPU backend does (its idx callbacks get all samples)."""
    cpu = mlo.hypergrad(quad.stochastic_problem, X0, Y0)
    gpu = mlo.hypergrad(dev, X0, Y0)
    assert gpu.success and gpu.nit == cpu.nit
    np.testing.assert_allclose(gpu.grad, cpu.grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gpu.grad, quad.hypergrad(X0), rtol=1e-8)
    low = mlo.solve_lower(dev, X0, Y0)
    np.testing.assert_allclose(low.y, mlo.solve_lower(quad.stochastic_problem, X0, Y0).y,
                               rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# SABA, BSA, TTSA, AID, alternating; the fixed-batches sampler
# ---------------------------------------------------------------------------------------
NEW_METHODS = ["saba", "bsa", "ttsa", "aid", "alternating"]


def _assert_same_run(r, c, atol):
    assert r.status == c.status and r.nit == c.nit and r.method == c.method
    np.testing.assert_allclose(r.x, c.x, rtol=0, atol=atol)
    np.testing.assert_allclose(r.y, c.y, rtol=0, atol=atol)
    for key in ("iteration", "oracle_calls", "samples"):
        np.testing.assert_array_equal(r.history[key], c.history[key])
    for key in ("dist_to_x_star", "F", "grad_norm_sq"):
        np.testing.assert_allclose(r.history[key], c.history[key], rtol=1e-10, atol=1e-12)
    assert r.oracle_calls == c.oracle_calls and r.oracle_samples == c.oracle_samples
    assert r.batch_size == c.batch_size
    assert r.steps["neumann_step"] == pytest.approx(c.steps["neumann_step"], rel=1e-8)


def _saba_views(res, nb):
    from mlocore.stochastic import saba_tables
    work = res.state["work"]
    work = work.copy_to_host() if is_device_array(work) else work
    return saba_tables(work, 2, 3, nb, nb)


def _assert_same_state(r, c, method, nb=1):
    if method == "saba":
        tr, tc = _saba_views(r, nb), _saba_views(c, nb)
        assert tr["filled"] and tc["filled"]
        for key in ("v", "mean_lower", "mean_upper", "table_lower", "table_upper"):
            np.testing.assert_allclose(tr[key], tc[key], rtol=0, atol=1e-10)
    elif method == "aid":
        np.testing.assert_allclose(r.state["work"].copy_to_host(), c.state["work"],
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_new_methods_full_batch_match_cpu(quad, dev, method):
    """batch_size = n_samples: the deterministic algorithm, the CPU run to 1e-10 (iterates,
    history, oracle counts; SABA's tables, AID's warm-started v); BSA / TTSA's random
    numbers of Neumann terms come from the CPU's SplitMix64 stream (seeded alike)."""
    kw = dict(batch_size=8, step=0.2, inner_step=0.3, maxiter=6, eval_every=3, seed=5)
    r = _dev(dev, quad, method, **kw)
    c = _cpu(quad, method, **kw)
    assert r.status == 20 and r.nit == 6
    _assert_same_run(r, c, 1e-10)
    _assert_same_state(r, c, method)
    # x0, y0 in; read-backs: per checkpoint, y at the end, and for AID (eta's default from
    # the full-batch L_g, as on the CPU) one power iteration; the tail average (x, y)
    assert r.transfers["h2d"] == 2
    averaged = 1 if METHODS[method].average else 0   # SABA returns the last iterate
    assert r.transfers["d2h"] == 3 + 1 + averaged + (1 if method == "aid" else 0)


@pytest.mark.parametrize("method,options", [("saba", {"memory_init": "full"}),
                                            ("saba", {"memory_init": "zeros"}),
                                            ("stocbio", {}), ("bsa", {}), ("aid", {})])
def test_fixed_batches_match_cpu_with_minibatches(quad, dev, method, options):
    """sampler="batches", batch 3 of 8 (batches of 3, 3, 2; SAGA weights 9/8, 3/4): the
    permutation and the per-epoch batch orders are the CPU's for the seed, so the device run
    equals the CPU run with minibatches (to rounding); one permutation copied per level."""
    kw = dict(batch_size=3, step=0.2, inner_step=0.2 if method == "saba" else 0.3,
              maxiter=6, eval_every=3, seed=7, sampler="batches", **options)
    r = _dev(dev, quad, method, **kw)
    c = _cpu(quad, method, **kw)
    _assert_same_run(r, c, 1e-12)
    _assert_same_state(r, c, method, nb=3)
    assert r.oracle_samples["upper_grad"] < 6 * 8  # minibatches, not the full batch
    assert r.transfers["h2d"] == 2 + 2
    other = _dev(dev, quad, method, **{**kw, "seed": 8})
    assert np.abs(other.x - r.x).max() > 1e-6


def test_saba_tables_exact(quad, dev):
    """memory_init="full": after the first iteration every row was computed at (x0, y0,
    v = 0), so the running means are the full-batch quantities there (grad_y g, 0, 0;
    grad_y f, grad_x f). memory_init="zeros": after one epoch (each fixed batch visited
    once) no zero row is left and the means are the sample-weighted means of the rows."""
    z0 = np.concatenate([X0, Y0])
    full = np.arange(8, dtype=np.int64)
    gl = quad_sample_grad(z0, full, *quad.lower_samples, quad.ridge)
    gu = quad_sample_grad(z0, full, *quad.upper_samples, quad.ridge)
    kw = dict(batch_size=4, step=0.2, inner_step=0.2, eval_every=1, seed=3)
    t = _saba_views(_dev(dev, quad, "saba", maxiter=1, memory_init="full", **kw), 2)
    np.testing.assert_allclose(t["mean_lower"], np.concatenate([gl[2:], np.zeros(5)]),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(t["mean_upper"], np.concatenate([gu[2:], gu[:2]]),
                               rtol=0, atol=1e-12)
    t = _saba_views(_dev(dev, quad, "saba", maxiter=2, memory_init="zeros", **kw), 2)
    for level in ("lower", "upper"):
        rows = t["table_" + level]
        assert np.all(np.abs(rows).sum(axis=1) > 0)
        np.testing.assert_allclose(t["mean_" + level], rows.mean(axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["aid", "alternating"])
def test_new_methods_uniform_minibatches_reproducible(quad, dev, method):
    kw = dict(batch_size=2, step=0.2, inner_step=0.3, maxiter=4)
    a = _dev(dev, quad, method, seed=11, eval_every=4, **kw)
    b = _dev(dev, quad, method, seed=11, eval_every=3, **kw)
    c = _dev(dev, quad, method, seed=12, eval_every=4, **kw)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.oracle_calls == b.oracle_calls
    assert np.abs(a.x - c.x).max() > 1e-6
    assert a.transfers["h2d"] == 3  # x0, y0 and the generator states


@pytest.mark.parametrize("method", ["bsa", "ttsa"])
def test_new_methods_uniform_minibatches_reproducible_and_converge(quad, dev, method):
    """Indices drawn on the device (the number of Neumann terms on the host): the same seed
    gives the same bits whatever the chunking, another seed differs; batch 4 of 8,
    alpha_k = 0.2 / sqrt(1 + k/10), 30 iterations from |x0 - x*| = 3.1: the CPU ends at
    a median distance of about 0.45 (BSA) / 0.3 (TTSA) over seeds 0-5, the device's two
    seeds at 0.29, 0.42 (BSA) / 0.26, 0.48 (TTSA); they must stay within twice the CPU's
    median."""
    kw = dict(batch_size=4, step=mlo.Schedule(0.2, 0.5, 10.0), inner_step=0.3, maxiter=30)
    a = _dev(dev, quad, method, seed=0, eval_every=30, **kw)
    b = _dev(dev, quad, method, seed=0, eval_every=20, **kw)
    c = _dev(dev, quad, method, seed=1, eval_every=30, **kw)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.oracle_calls == b.oracle_calls and a.oracle_samples["upper_grad"] == 30 * 4
    assert np.abs(a.x - c.x).max() > 1e-6
    assert a.transfers["h2d"] == 3  # x0, y0 and the generator states
    cpu = [_cpu(quad, method, seed=s, eval_every=30, **kw).history["dist_to_x_star"][-1]
           for s in range(6)]
    devd = [r.history["dist_to_x_star"][-1] for r in (a, c)]
    assert a.history["dist_to_x_star"][0] > 3.0
    assert max(devd) < 2.0 * np.median(cpu) and np.median(cpu) < 0.6, (devd, cpu)


def test_saba_converges_linearly_like_cpu(quad, dev):
    """Constant steps, fixed batches of 4: SABA converges to x* itself (no noise ball); the
    device run is the CPU run."""
    kw = dict(batch_size=4, step=0.2, inner_step=0.1, maxiter=40, eval_every=20, seed=0)
    r = _dev(dev, quad, "saba", **kw)
    c = _cpu(quad, "saba", **kw)
    assert r.history["dist_to_x_star"][-1] < 0.01 < 3.0 < r.history["dist_to_x_star"][0]
    np.testing.assert_allclose(r.x, c.x, rtol=0, atol=1e-12)


def test_new_methods_diverge_with_status_13(quad, dev):
    for method in ("saba", "bsa"):
        r = _dev(dev, quad, method, batch_size=2, step=1e3, inner_step=1e3, maxiter=20,
                 eval_every=5, seed=0)
        assert r.status == 13 and "Diverged" in r.message and r.nit < 20
        assert np.all(np.isfinite(r.x)) and np.all(np.isfinite(r.y))


def test_saba_backtracking_rewinds_tables_like_cpu(quad, dev, monkeypatch):
    """Default steps with a far too large upper step (L_F patched): each divergence halves
    it and resumes from a saved state, the tables, the flag and the host batch orders
    included; the device run stays the CPU run."""
    from mlocore.stochastic import _device as dev_driver
    from mlocore.stochastic import _driver as cpu_driver
    monkeypatch.setattr(cpu_driver, "estimate_lipschitz", lambda *a, **k: 1e-3)
    monkeypatch.setattr(dev_driver, "upper_lipschitz", lambda *a, **k: 1e-3)
    kw = dict(batch_size=4, inner_step=0.1, maxiter=10, eval_every=5, seed=0, backtrack=20)
    r = _dev(dev, quad, "saba", **kw)
    c = _cpu(quad, "saba", **kw)
    assert c.step_reductions > 3 and r.step_reductions == c.step_reductions
    assert r.steps["alpha"].initial == c.steps["alpha"].initial
    np.testing.assert_allclose(r.x, c.x, rtol=0, atol=1e-10)
    _assert_same_state(r, c, "saba", nb=2)


# ---------------------------------------------------------------------------------------
# SUSTAIN, MRBO, VRBO, STABLE, Hessian-free, penalty, primal-dual
# (mlocore/stochastic/)
# ---------------------------------------------------------------------------------------
NEUMANN2 = dict(neumann_terms=3, neumann_step=0.3)
VARIANCE_OPTIONS = {"sustain": NEUMANN2, "mrbo": NEUMANN2, "vrbo": {**NEUMANN2, "period": 2},
                    "stable": dict(hessian_floor=0.1),
                    "hessian-free": dict(inner_steps=2, directions=2),
                    "penalty": dict(inner_steps=2), "primal-dual": dict(inner_steps=2)}
VARIANCE_METHODS = list(VARIANCE_OPTIONS)


def _vrun(problem, method, x0=X0, y0=Y0, **kw):
    return minimize_stochastic(problem, x0, y0, method, reference=kw.pop("reference", None),
                               **{**VARIANCE_OPTIONS[method], **kw})


def _vcpu(quad, method, problem=None, **kw):
    return mlo.minimize_bilevel(quad.stochastic_problem if problem is None else problem, X0, Y0,
                                method=method, **{**VARIANCE_OPTIONS[method], **kw})


def _assert_same_variance_run(r, c, atol):
    _assert_same_run(r, c, atol)
    work = r.state["work"]
    work = work.copy_to_host() if is_device_array(work) else work
    np.testing.assert_allclose(work, c.state["work"], rtol=0, atol=atol)
    if r.method == "primal-dual":
        assert r.multiplier == pytest.approx(c.multiplier, rel=1e-12, abs=atol)


@pytest.mark.parametrize("sampling", ["full", "batches"])
@pytest.mark.parametrize("method", VARIANCE_METHODS)
def test_variance_methods_match_cpu(quad, dev, method, sampling):
    """batch_size = n_samples (the deterministic algorithm) and sampler="batches" (batch 3
    of 8: the CPU's permutation and per-epoch orders): the device run is the CPU run to
    1e-10 (iterates, history, oracle counts, the method state in the CPU layout: SUSTAIN /
    MRBO / VRBO's estimates and previous point, STABLE's averaged Hessians, yhat and the
    multiplier). SUSTAIN's random truncations come from the host SplitMix64 stream and the
    Hessian-free directions from the same stream evaluated on the device, so both follow
    the CPU's draws; VRBO (period 2) refreshes on the full batch and recurses in between."""
    kw = dict(step=0.2, inner_step=0.3, maxiter=6, eval_every=3, seed=5, reference=quad)
    kw.update(batch_size=8) if sampling == "full" else \
        kw.update(batch_size=3, sampler="batches", seed=7)
    checks = 0 if getattr(dev, "_sample_checked", False) else 2  # first run on dev
    r = _vrun(dev, method, **kw)
    c = _vcpu(quad, method, **kw)
    assert r.status == c.status == 20 and r.nit == 6
    _assert_same_variance_run(r, c, 1e-10)
    if sampling == "batches":
        assert r.oracle_samples["upper_grad"] < r.oracle_calls["upper_grad"] * 8
        assert r.transfers["h2d"] == 2 + 2  # x0, y0, one permutation per level
    else:
        assert r.oracle_samples["upper_grad"] == r.oracle_calls["upper_grad"] * 8
        assert r.transfers["h2d"] == 2
    # read-backs: per checkpoint and y at the end (and the callback checks of a first run);
    # none per iteration, except the penalty methods' value callbacks (their own, uncounted);
    # the tail average (x, y) once, except for VRBO (the last iterate)
    assert r.transfers["d2h"] == 3 + 1 + (1 if METHODS[method].average else 0) + checks


CONVERGE_OPTIONS = {"sustain": dict(momentum=0.5, inner_momentum=0.5),
                    "mrbo": dict(momentum=0.5, inner_momentum=0.5),
                    "vrbo": dict(sampler="uniform", period=4),
                    "penalty": dict(rho=10.0)}  # the former default: 20 iterations suffice


@pytest.mark.parametrize("method", VARIANCE_METHODS)
def test_variance_methods_uniform_reproducible_and_converge(quad, dev, method):
    """Indices (and the Hessian-free directions) drawn on the device: the same seed gives the
    same bits whatever the chunking, another seed differs; 20 iterations (batch 4 of 8,
    alpha_k = 0.2 / sqrt(1 + k/10), beta = 0.3, from |x0 - x*| = 3.1) converge like the CPU's
    runs: the final distance must be within the CPU's spread over seeds 0-5 (below their
    maximum or twice their median). Measured (CPU median of seeds 0-5 / device seeds 0, 1):
    SUSTAIN 0.14 / 0.28, 0.39; MRBO 0.25 / 0.10, 0.10; VRBO 0.05 / 0.08, 0.05; STABLE 0.16 /
    0.14, 0.56; Hessian-free 0.25 / 0.31, 0.04; penalty (rho = 10, biased) 1.42 / 1.49,
    1.64; primal-dual 0.31 / 0.53, 0.56. Over more seeds (device 12, CPU 100) the medians
    agree: SUSTAIN 0.27 / 0.26, STABLE 0.23 / 0.20, primal-dual 0.39 / 0.38."""
    kw = dict(batch_size=4, step=mlo.Schedule(0.2, 0.5, 10.0), inner_step=0.3,
              reference=quad, **CONVERGE_OPTIONS.get(method, {}))
    a = _vrun(dev, method, seed=0, maxiter=20, eval_every=4, **kw)
    b = _vrun(dev, method, seed=0, maxiter=4, eval_every=3, **kw)
    c = _vrun(dev, method, seed=1, maxiter=4, eval_every=4, **kw)
    for key in ("F", "dist_to_x_star"):  # b's iterate at 4 is a's at 4, bit for bit
        assert b.history[key][-1] == a.history[key][1]
    assert b.history["oracle_calls"][-1] == a.history["oracle_calls"][1]
    assert np.abs(b.x - c.x).max() > 1e-6
    assert a.transfers["h2d"] == 3  # x0, y0 and the generator states
    cpu = [_vcpu(quad, method, seed=s, maxiter=20, eval_every=20,
                 **kw).history["dist_to_x_star"][-1] for s in range(6)]
    d = a.history["dist_to_x_star"]
    assert d[0] > 3.0 and d[-1] < max(2.0 * np.median(cpu), max(cpu)), (d[-1], cpu)
    assert d[-1] < (0.6 if method == "penalty" else 0.2) * d[0]


def test_variance_methods_diverge_with_status_13(quad, dev):
    for method in VARIANCE_METHODS:
        r = _vrun(dev, method, batch_size=2, step=1e3, inner_step=1e3, maxiter=6,
                  eval_every=2, seed=0)
        assert r.status == 13 and "Diverged" in r.message and r.nit < 6, method
        assert np.all(np.isfinite(r.x)) and np.all(np.isfinite(r.y)), method


def test_momentum_backtracking_rewinds_state_like_cpu(quad, dev, monkeypatch):
    """Default upper step far too large (L_F patched on both backends): each divergence
    halves it and resumes from a saved state (MRBO's estimates, previous point and started
    flag included); the device run stays the CPU run."""
    from mlocore.stochastic import _device as dev_driver
    from mlocore.stochastic import _driver as cpu_driver
    monkeypatch.setattr(cpu_driver, "estimate_lipschitz", lambda *a, **k: 1e-3)
    monkeypatch.setattr(dev_driver, "upper_lipschitz", lambda *a, **k: 1e-3)
    kw = dict(batch_size=8, inner_step=0.3, maxiter=8, eval_every=4, seed=0, backtrack=20,
              reference=quad)
    r = _vrun(dev, "mrbo", **kw)
    c = _vcpu(quad, "mrbo", **kw)
    assert c.step_reductions > 3 and r.step_reductions == c.step_reductions
    assert r.steps["alpha"].initial == c.steps["alpha"].initial
    _assert_same_variance_run(r, c, 1e-10)


def test_variance_method_options_validated_like_cpu(quad, dev):
    kw = dict(batch_size=4, step=0.1, inner_step=0.1, maxiter=1, seed=0)
    bad = [("sustain", dict(momentum=2.0), ValueError, r"momentum must be in \(0, 1\]"),
           ("mrbo", dict(inner_momentum=0.0), ValueError, "inner_momentum"),
           ("vrbo", dict(period=0), ValueError, "period"),
           ("stable", dict(tau=1.5), ValueError, r"tau must be in \(0, 1\]"),
           ("stable", dict(hessian_floor=-1.0), ValueError, "hessian_floor"),
           ("hessian-free", dict(directions=0), ValueError, "directions"),
           ("hessian-free", dict(smoothing=0.0), ValueError, "smoothing"),
           ("penalty", dict(rho=-1.0), ValueError, "rho"),
           ("primal-dual", dict(dual_step=0.0), ValueError, "dual_step"),
           ("primal-dual", dict(rho=1.0), TypeError, "unexpected keyword argument 'rho'"),
           ("stable", dict(neumann_terms=3), TypeError, "does not use neumann_terms"),
           ("penalty", dict(neumann_step=0.1), TypeError, "does not use neumann_step")]
    for method, opts, exc, match in bad:
        for run in (lambda: minimize_stochastic(dev, X0, Y0, method, **kw, **opts),
                    lambda: mlo.minimize_bilevel(quad.stochastic_problem, X0, Y0,
                                                 method=method, **kw, **opts)):
            with pytest.raises(exc, match=match):
                run()
    no_value = DeviceBilevelProblem(dev.upper, DeviceObjective(
        quad_sample_grad_device, hvp=quad_sample_hvp_device, args=dev.lower.args,
        n_samples=8), dims=(2, 3))
    with pytest.raises(ValueError, match="needs the lower objective's value callback"):
        minimize_stochastic(no_value, X0, Y0, "penalty", **kw)
    grad_only = DeviceBilevelProblem(dev.upper, DeviceObjective(
        quad_sample_grad_device, value=quad_sample_value_device, args=dev.lower.args,
        n_samples=8), dims=(2, 3))
    with pytest.raises(ValueError, match="needs explicit step and inner_step"):
        minimize_stochastic(grad_only, X0, Y0, "hessian-free", batch_size=4, maxiter=1)
    with pytest.raises(ValueError, match="needs the lower objective's hvp"):
        minimize_stochastic(grad_only, X0, Y0, "mrbo", **kw)


@pytest.mark.parametrize("method", ["hessian-free", "primal-dual"])
def test_gradient_only_methods_without_lower_hvp(quad, method):
    """Hessian-free and the value-function methods call no HVP: a lower objective without
    hvp runs (explicit steps) and is the CPU run (full batch)."""
    lower = DeviceObjective(quad_sample_grad_device, value=quad_sample_value_device,
                            args=stochastic_quadratic_device_problem(quad).lower.args,
                            n_samples=8)
    problem = DeviceBilevelProblem(stochastic_quadratic_device_problem(quad).upper, lower,
                                   dims=(2, 3))
    kw = dict(batch_size=8, step=0.2, inner_step=0.3, maxiter=4, eval_every=2, seed=1,
              reference=quad)
    r = _vrun(problem, method, **kw)
    c = _vcpu(quad, method, **kw)
    assert r.oracle_calls["lower_hvp"] == c.oracle_calls["lower_hvp"] == 0
    _assert_same_variance_run(r, c, 1e-10)


# ---------------------------------------------------------------------------------------
# Tail averaging and step="auto" on the device
# ---------------------------------------------------------------------------------------
def test_step_search_and_average_match_cpu(quad, dev):
    """Fixed minibatches (the CPU's batches): the device's step search (grid, scores, choice,
    counts) and tail-averaged result equal the CPU's; reproducible from the seed."""
    kw = dict(batch_size=4, sampler="batches", maxiter=20, eval_every=5, seed=3, step="auto")
    r = minimize_stochastic(dev, X0, Y0, "soba", **kw)
    c = mlo.minimize_bilevel(quad.stochastic_problem, X0, Y0, method="soba", **kw)
    rs, cs = r.step_search, c.step_search
    assert rs["iterations"] == cs["iterations"] == 2 and len(rs["grid"]) in (9, 10)
    assert len(rs["grid"]) == len(cs["grid"]) == len(rs["scores"])
    np.testing.assert_allclose(rs["grid"], cs["grid"], rtol=1e-12)
    np.testing.assert_allclose(rs["scores"], cs["scores"], rtol=1e-8)
    assert rs["best"] == cs["best"] and rs["score"] == cs["score"]
    assert rs["oracle_calls"] == cs["oracle_calls"] and r.oracle_calls == c.oracle_calls
    assert r.average == c.average == {"fraction": 0.5, "iterations": 10}
    np.testing.assert_allclose(r.x, c.x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.y, c.y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.x_last, c.x_last, rtol=0, atol=1e-12)
    again = minimize_stochastic(dev, X0, Y0, "soba", **kw)
    np.testing.assert_array_equal(again.x, r.x)
    assert again.step_search["scores"] == rs["scores"]
    with pytest.raises(ValueError, match="got 'fast'"):
        minimize_stochastic(dev, X0, Y0, "soba", maxiter=2, step="fast")
