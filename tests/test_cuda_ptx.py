"""Every CUDA kernel compiles for a real GPU, with the argument types it is really launched with.

numba's simulator (which runs the CUDA tests here) accepts code that the GPU target rejects
(builtin ``max`` of two scalars, Python objects, exceptions, allocation, CPU ``@njit`` calls,
type unification the GPU target does not do, ...). This test

1. runs small representative workloads under the simulator (linear solvers, implicit and
   unrolled hypergradients of the device problem library, the deterministic minimizer, the
   n-level problems, the stochastic minimizers, the benchmark's tridiagonal problem), with
   :meth:`FakeCUDAKernel.__call__` wrapped to record every launched kernel (its module and
   qualified name) and the numba types of its arguments (arrays: ``numba.typeof`` of their
   NumPy data, xoroshiro128p states as ``xoroshiro128p_type`` arrays; Python floats float64,
   ints int64, bools boolean);
2. compiles each distinct (kernel, signature) to PTX for compute capability 8.0 with numba's
   real CUDA target (libNVVM, no GPU needed), in ONE subprocess without the simulator, and
   assembles the PTX with ``ptxas -arch=sm_80`` where the CUDA toolkit's ptxas is on PATH.

It fails listing every kernel that does not compile, with the compiler's message, every
module-level kernel of the CUDA modules that no workload launched (add a workload), and
every workload that raised. It skips where libNVVM is missing. Kernels built inside factories
(the batched mode's ``_build_kernels``) are compiled by
``tests/test_cuda_batched.py::test_kernels_compile_for_a_real_gpu`` and skipped here.
"""
import importlib
import inspect
import json
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest
from numba import config as numba_config

pytestmark = pytest.mark.cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: modules whose module-level kernels must all be launched by some workload below
KERNEL_MODULES = ("mlocore.cuda._linalg", "mlocore.cuda._unrolled", "mlocore.cuda._direct",
                  "mlocore.stochastic._device", "mlocore.stochastic.alternating",
                  "mlocore.stochastic.aid",
                  "mlocore.stochastic.soba", "mlocore.stochastic.saba",
                  "mlocore.stochastic.stable", "mlocore.stochastic.hessian_free",
                  "mlocore.stochastic.penalty",
                  "mlocore.problems.cuda_callbacks", "mlocore.problems.nlevel_quadratic",
                  "mlocore.problems.nonquadratic_trilevel",
                  "mlocore.problems.cuda_stochastic")
BENCHMARK_FILE = os.path.join(ROOT, "benchmarks", "cuda_ratios.py")


# ---------------------------------------------------------------------------------------
# Recording launches under the simulator
# ---------------------------------------------------------------------------------------
def _describe(arg):
    """A JSON-able description of one launch argument's numba type (rebuilt in the
    compiling subprocess by :data:`_PTX_SCRIPT`'s ``_type``)."""
    from numba.cuda.random import xoroshiro128p_dtype
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    if isinstance(arg, FakeCUDAArray):
        arg = arg._ary
    if isinstance(arg, np.ndarray):
        ty = numba.typeof(arg)
        if arg.dtype == xoroshiro128p_dtype:
            return ["xoroshiro128p", ty.ndim, ty.layout]
        return ["array", str(ty.dtype), ty.ndim, ty.layout, bool(ty.mutable)]
    if isinstance(arg, (bool, np.bool_)):
        return ["scalar", "boolean"]
    if isinstance(arg, int):
        return ["scalar", "int64"]
    if isinstance(arg, float):
        return ["scalar", "float64"]
    if isinstance(arg, np.generic):
        return ["scalar", str(numba.typeof(arg))]
    raise TypeError(f"unexpected kernel argument {arg!r} ({type(arg).__name__})")


class _Recorder:
    def __init__(self):
        self.launches = {}     # (module, qualname, file) -> set of signatures (JSON strings)
        self.factory = set()   # kernels built inside factories (not importable by name)

    def record(self, kernel, args):
        fn = kernel.fn
        qualname = fn.__qualname__
        if "<locals>" in qualname:
            self.factory.add(f"{fn.__module__}.{qualname}")
            return
        key = (fn.__module__, qualname, inspect.getsourcefile(fn))
        sig = json.dumps([_describe(a) for a in args])
        self.launches.setdefault(key, set()).add(sig)


@pytest.fixture
def recorder(monkeypatch):
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    rec = _Recorder()
    original = FakeCUDAKernel.__call__

    def recording_call(self, *args):
        if not self._device:
            rec.record(self, args)
        return original(self, *args)

    monkeypatch.setattr(FakeCUDAKernel, "__call__", recording_call)
    return rec


# ---------------------------------------------------------------------------------------
# Workloads (tiny sizes, few iterations: the simulator runs one Python thread per thread)
# ---------------------------------------------------------------------------------------
def _spd(n, seed=0):
    rng = np.random.default_rng(seed)
    R = rng.standard_normal((n, n))
    return R @ R.T / n + np.eye(n)


def _linalg():
    import mlocore as mlo
    from mlocore.cuda import _linalg as dl
    A, b = _spd(5), np.linspace(1.0, 2.0, 5)
    mlo.linalg.cg(A, b, x0=np.ones(5), backend="cuda", maxiter=3)
    mlo.linalg.neumann(A, b, backend="cuda", maxiter=2)            # power iteration too
    mlo.linalg.solve_direct(A, b, backend="cuda")                  # one-block Cholesky
    old = dl.MAX_BLOCKS
    dl.MAX_BLOCKS = 2  # two blocks: the second reduction pass (_sum_partials_kernel)
    try:
        mlo.linalg.cg(A, b, backend="cuda", maxiter=1)
    finally:
        dl.MAX_BLOCKS = old


def _implicit_and_unrolled():
    import mlocore as mlo
    from mlocore.problems import make_cleaning, make_logistic, make_quadratic
    from mlocore.problems.cuda_callbacks import (cleaning_device_problem,
                                                 logistic_device_problem,
                                                 quadratic_device_problem)
    q = make_quadratic(dx=2, dy=3, seed=0)
    lh = make_logistic(n_train=6, n_val=5, n_features=2, seed=0)
    dc = make_cleaning(n_train=5, n_val=4, n_features=2, n_classes=3, seed=0, upper_reg=0.1)
    for problem, dx, dy in ((quadratic_device_problem(q), q.dx, q.dy),
                            (logistic_device_problem(lh), 2, 2),
                            (cleaning_device_problem(dc), dc.dx, dc.dy)):
        x, y = np.full(dx, 0.1), np.zeros(dy)
        for method, kw in (("cg", {"maxiter": 2, "lower_maxiter": 2}),
                           ("neumann", {"maxiter": 2, "lower_maxiter": 2}),
                           ("itd-reverse", {"T": 2}), ("itd-forward", {"T": 2})):
            mlo.hypergrad(problem, x, y, method=method, **kw)
    problem = quadratic_device_problem(q)
    mlo.minimize_bilevel(problem, np.ones(q.dx), np.zeros(q.dy), method="aid", maxiter=1)


def _multilevel():
    import mlocore as mlo
    from mlocore.problems.cuda_multilevel import (nlevel_quadratic_device_problem,
                                                  nonquadratic_trilevel_device_problem,
                                                  trilevel_quadratic_device_problem)
    from mlocore.problems.multilevel import (make_nlevel_quadratic, make_nonquadratic_trilevel,
                                             make_trilevel_quadratic)
    tq = make_trilevel_quadratic(dim=1)
    mlo.hypergrad(trilevel_quadratic_device_problem(tq), [np.array([0.3]), np.zeros(1),
                                                          np.zeros(1)], method="truncated")
    nq = make_nlevel_quadratic(3, dims=(1, 1, 1), seed=1)
    mlo.hypergrad(nlevel_quadratic_device_problem(nq), [np.array([0.5]), np.zeros(1),
                                                        np.zeros(1)], method="truncated")
    nt = make_nonquadratic_trilevel()
    dp = nonquadratic_trilevel_device_problem(nt)
    mlo.hypergrad(dp, [np.full(d, 0.1) for d in dp.dims], method="exact")


def _stochastic():
    """Every device stochastic method, two iterations of minibatch 2 (fewest inner steps and
    Neumann terms), the value callback, and the projections (box bounds, Ball)."""
    from numba import cuda
    from mlocore.stochastic import METHODS
    from mlocore.cuda import DEVICE_STOCHASTIC_METHODS, minimize_stochastic
    from mlocore.problems import make_quadratic
    from mlocore.problems.cuda_stochastic import stochastic_quadratic_device_problem
    quad = make_quadratic(dx=2, dy=2, n_outer=4, n_inner=4, seed=3, ridge=1.0)
    dev = stochastic_quadratic_device_problem(quad)
    x0, y0 = np.array([1.0, -1.0]), np.array([0.5, 0.0])
    cheap = {"inner_steps": 1, "neumann_terms": 4, "neumann_step": 0.3}  # BSA/TTSA draw
    # their number of products on {0..3}: with seed 0 some iteration draws one or more
    for method in DEVICE_STOCHASTIC_METHODS:
        uses = getattr(METHODS[method], "uses", ())
        kw = {k: v for k, v in cheap.items() if k in uses}
        minimize_stochastic(dev, x0, y0, method, batch_size=2, step=0.1, inner_step=0.1,
                            maxiter=2, eval_every=2, seed=0, reference=quad, **kw)
    up = dev.upper.full_batch()  # the value callback (the runs above do not evaluate it)
    up.value(cuda.to_device(np.concatenate([x0, y0])), *up.args)
    from mlocore.cuda import DeviceBilevelProblem
    from mlocore import Ball
    for constraint in (dict(bounds=(-0.5, 0.5)), dict(project=Ball(0.5))):  # x projected
        boxed = DeviceBilevelProblem(dev.upper, dev.lower, dev.dims, **constraint)
        minimize_stochastic(boxed, x0, y0, "soba", batch_size=2, step=0.1, inner_step=0.1,
                            maxiter=1, eval_every=1, seed=0)


def _benchmark_tridiagonal():
    import mlocore as mlo
    spec = importlib.util.spec_from_file_location("cuda_ratios", BENCHMARK_FILE)
    mod = sys.modules.get("cuda_ratios")
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules["cuda_ratios"] = mod
        spec.loader.exec_module(mod)
    _, dev = mod.structured_problems(4, np.random.default_rng(0))
    mlo.hypergrad(dev, np.ones(mod.DX), np.zeros(4), method="cg", lower_maxiter=1,
                  maxiter=1)


WORKLOADS = [_linalg, _implicit_and_unrolled, _multilevel, _stochastic, _benchmark_tridiagonal]


# ---------------------------------------------------------------------------------------
# Compiling for cc 8.0 in one subprocess, without the simulator
# ---------------------------------------------------------------------------------------
_PTX_SCRIPT = r"""
import importlib, importlib.util, json, os, shutil, subprocess, sys, tempfile, traceback
from numba import cuda, types
from numba.cuda.cudadrv.error import CudaSupportError, NvvmSupportError
from numba.cuda.cudadrv.nvvm import NvvmError
from numba.cuda.random import xoroshiro128p_type
import numba.cuda.dispatcher as dispatcher


class _Device:  # device functions ask the current device for its compute capability
    compute_capability = (8, 0)


dispatcher.get_current_device = lambda: _Device()


def _probe():
    def probe(a):
        a[0] = 1.0
    cuda.compile_ptx(probe, types.void(types.float64[::1]), cc=(8, 0))


try:
    _probe()
except (CudaSupportError, NvvmSupportError, NvvmError, OSError) as exc:
    print("NVVM unavailable:", exc)
    sys.exit(77)


def _type(d):
    if d[0] == "scalar":
        return getattr(types, d[1])
    if d[0] == "xoroshiro128p":
        return types.Array(xoroshiro128p_type, d[1], d[2])
    return types.Array(getattr(types, d[1]), d[2], d[3], readonly=not d[4])


def _module(name, path):
    try:
        return importlib.import_module(name)
    except ImportError:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod


PTXAS = shutil.which("ptxas")
results = []
for item in json.load(open(sys.argv[1])):
    try:
        obj = _module(item["module"], item["file"])
        for part in item["qualname"].split("."):
            obj = getattr(obj, part)
        pyfunc = obj.py_func
    except Exception as exc:
        for sig in item["sigs"]:
            results.append([item["name"], sig, "import: " + "".join(
                traceback.format_exception_only(type(exc), exc)).strip()])
        continue
    for sig in item["sigs"]:
        try:
            ptx, _ = cuda.compile_ptx(pyfunc, types.void(*[_type(d) for d in json.loads(sig)]),
                                      cc=(8, 0))
        except Exception as exc:
            msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            results.append([item["name"], sig, msg])
            continue
        msg = None
        if PTXAS:  # assemble too, where the CUDA toolkit's ptxas is installed
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "k.ptx")
                with open(src, "w") as fh:
                    fh.write(ptx)
                proc = subprocess.run([PTXAS, "-arch=sm_80", src, "-o",
                                       os.path.join(tmp, "k.cubin")],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    msg = "ptxas: " + (proc.stderr or proc.stdout).strip()
        results.append([item["name"], sig, msg])
json.dump(results, open(sys.argv[2], "w"))
"""


#: numba 0.68's CUDA target reports some unsupported calls without a source location
_SIGNATURE_MISMATCH_HINT = (
    "\n(numba's CUDA target raises this, with no line number, for a call it cannot type in "
    "the kernel or a device function it calls: typically the builtin max/min of two scalars "
    "or a NumPy allocation such as np.empty)")


def _module_kernels():
    """``module.name`` of every module-level (non-device) kernel of KERNEL_MODULES and the
    benchmark."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    names = set()
    mods = [importlib.import_module(m) for m in KERNEL_MODULES]
    if "cuda_ratios" in sys.modules:
        mods.append(sys.modules["cuda_ratios"])
    for mod in mods:
        for attr, obj in vars(mod).items():
            if isinstance(obj, FakeCUDAKernel) and not obj._device \
                    and getattr(obj.fn, "__module__", None) == mod.__name__:
                names.add(f"{mod.__name__}.{obj.fn.__qualname__}")
    return names


@pytest.mark.skipif(not numba_config.ENABLE_CUDASIM,
                    reason="records launches through numba's CUDA simulator")
def test_every_kernel_compiles_for_a_real_gpu(recorder, tmp_path):
    import warnings
    t0 = time.perf_counter()
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for workload in WORKLOADS:
            try:
                workload()
            except Exception as exc:  # report, and still compile what was launched
                errors.append(f"workload {workload.__name__} raised "
                              f"{type(exc).__name__}: {exc}")
    t_run = time.perf_counter() - t0
    items = [{"module": m, "qualname": q, "file": f, "name": f"{m}.{q}",
              "sigs": sorted(sigs)} for (m, q, f), sigs in sorted(recorder.launches.items())]
    launched = {it["name"] for it in items}
    missing = sorted(_module_kernels() - launched)
    if missing:
        errors.append("kernels launched by no workload (add one to tests/test_cuda_ptx.py): "
                      + ", ".join(missing))
    n_sigs = sum(len(it["sigs"]) for it in items)
    job, out = tmp_path / "kernels.json", tmp_path / "ptx.json"
    job.write_text(json.dumps(items))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t1 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, str(job), str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    t_ptx = time.perf_counter() - t1
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == n_sigs
    for name, sig, msg in results:
        if msg is not None:
            if "Signature mismatch" in msg:
                msg += _SIGNATURE_MISMATCH_HINT
            errors.append(f"{name}{tuple(tuple(d) for d in json.loads(sig))}:\n    "
                          + msg.replace("\n", "\n    "))
    print(f"\n{len(items)} kernels, {n_sigs} signatures compiled for sm_80 "
          f"(workloads {t_run:.1f} s, compilation {t_ptx:.1f} s); factory kernels left to "
          f"test_cuda_batched.py: {sorted(recorder.factory)}")
    assert not errors, f"{len(errors)} problem(s):\n" + "\n".join(errors)
