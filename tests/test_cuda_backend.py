"""The CPU/CUDA switch: per call, process-wide default, context manager, environment
variable; a clear error, never a silent CPU run, where CUDA cannot run or an entry point has
no CUDA path yet."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlocore as mlo
from mlocore.cuda import Transfers, is_device_array, to_device, to_host

pytestmark = pytest.mark.cuda


def _python(code, **env):
    """Run code in a fresh interpreter (numba reads NUMBA_ENABLE_CUDASIM at import)."""
    full_env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=120)


NO_GPU_CHECK = """
    import numpy as np, mlocore as mlo
    from mlocore.cuda import cuda_available, CudaUnavailableError
    if cuda_available():
        print("HAS-CUDA")
        raise SystemExit(0)
    A = np.eye(3) * 2.0
    try:
        mlo.linalg.cg(A, np.ones(3){kw})
    except CudaUnavailableError as exc:
        print("ERROR:", exc)
    else:
        print("RAN")
"""


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_cuda_without_gpu_is_a_clear_error(how):
    if how == "argument":
        out = _python(NO_GPU_CHECK.format(kw=", backend='cuda'"))
    else:
        out = _python(NO_GPU_CHECK.format(kw=""), MLOCORE_BACKEND="cuda")
    assert out.returncode == 0, out.stderr
    if "HAS-CUDA" in out.stdout:
        pytest.skip("this machine has a CUDA GPU")
    assert "ERROR:" in out.stdout, out.stdout  # never "RAN": no silent CPU run
    assert "no CUDA device is available" in out.stdout
    assert "NUMBA_ENABLE_CUDASIM=1" in out.stdout  # says how to get the simulator


def test_bad_environment_variable_is_reported():
    out = _python("import mlocore as mlo, numpy as np\n"
                  "mlo.linalg.cg(np.eye(2), np.ones(2))", MLOCORE_BACKEND="gpu")
    assert out.returncode != 0
    assert "MLOCORE_BACKEND must be 'cpu' or 'cuda', got 'gpu'" in out.stderr


def test_switch_function_and_context_manager():
    assert mlo.get_backend() == "cpu"
    with mlo.backend("cuda"):
        assert mlo.get_backend() == "cuda"
        with mlo.backend("cpu"):
            assert mlo.get_backend() == "cpu"
        assert mlo.get_backend() == "cuda"
    assert mlo.get_backend() == "cpu"
    mlo.set_backend("cuda")
    try:
        assert mlo.get_backend() == "cuda"
    finally:
        mlo.set_backend("cpu")
    with pytest.raises(ValueError, match="backend"):
        mlo.set_backend("tpu")
    with pytest.raises(ValueError, match="backend"):
        mlo.linalg.cg(np.eye(2), np.ones(2), backend="tpu")
    with pytest.raises(RuntimeError), mlo.backend("cuda"):  # restored after an exception
        raise RuntimeError
    assert mlo.get_backend() == "cpu"


def test_every_stochastic_method_has_a_device_loop():
    from mlocore.stochastic import STOCHASTIC_METHODS
    from mlocore.cuda import DEVICE_STOCHASTIC_METHODS
    assert set(STOCHASTIC_METHODS) == set(DEVICE_STOCHASTIC_METHODS)


def test_cpu_callbacks_on_cuda_need_device_callbacks(quad_problem):
    """A BilevelProblem of @njit callbacks cannot run on the device: a TypeError that points
    to DeviceBilevelProblem, never a silent CPU run."""
    x, y = np.zeros(3), np.zeros(6)
    for call in (lambda: mlo.hypergrad(quad_problem, x, y, backend="cuda"),
                 lambda: mlo.solve_lower(quad_problem, x, y, backend="cuda"),
                 lambda: mlo.minimize_bilevel(quad_problem, x, y, backend="cuda"),
                 lambda: mlo.HyperObjective(quad_problem, y, backend="cuda")):
        with pytest.raises(TypeError, match="device callbacks"):
            call()
    with mlo.backend("cuda"), pytest.raises(TypeError, match="device callbacks"):
        mlo.hypergrad(quad_problem, x, y)


def test_transfers_are_explicit_and_counted():
    t = Transfers()
    host = np.arange(4.0)
    d = to_device("x", host, t, 4)
    assert is_device_array(d) and not is_device_array(host)
    assert t.as_dict() == {"h2d": 1, "d2h": 0, "h2d_bytes": 32, "d2h_bytes": 0}
    assert to_device("x", d, t, 4) is d  # already on the device: no copy, not counted
    assert t.h2d == 1
    np.testing.assert_array_equal(to_host(d, t), host)
    assert t.d2h == 1 and t.d2h_bytes == 32
    with pytest.raises(ValueError, match=r"shape \(3,\), got shape \(4,\)"):
        to_device("x", host, t, 3)
    with pytest.raises(ValueError, match="non-finite"):
        to_device("x", [1.0, np.nan], t, 2)
    with pytest.raises(TypeError, match="dtype float64"):
        to_device("x", _float32_device(), t, 3)


def _float32_device():
    from numba import cuda
    return cuda.to_device(np.zeros(3, dtype=np.float32))


def test_cpu_multilevel_problem_on_cuda_needs_device_callbacks():
    from mlocore.problems import make_trilevel_quadratic
    p = make_trilevel_quadratic().problem
    with pytest.raises(TypeError, match="DeviceMultilevelProblem"):
        mlo.hypergrad(p, [np.zeros(d) for d in p.dims], backend="cuda")


def test_output_device_through_the_public_entry_points(quad_problem):
    """Outputs are NumPy unless asked otherwise; output="device" needs the CUDA backend."""
    from mlocore.problems import make_quadratic
    from mlocore.problems.cuda_callbacks import quadratic_device_problem
    x, y = np.zeros(3), np.zeros(6)
    for call in (lambda: mlo.hypergrad(quad_problem, x, y, output="device"),
                 lambda: mlo.solve_lower(quad_problem, x, y, output="device"),
                 lambda: mlo.minimize_bilevel(quad_problem, x, y, output="device")):
        with pytest.raises(ValueError, match="output='device' .* needs the CUDA backend"):
            call()
    with pytest.raises(ValueError, match="output must be 'numpy' or 'device'"):
        mlo.hypergrad(quad_problem, x, y, output="gpu")
    q = make_quadratic(dx=2, dy=3, n_outer=8, n_inner=8, seed=0)
    dev = quadratic_device_problem(q)
    x2, y3 = np.ones(2), np.zeros(3)
    on_device = mlo.hypergrad(dev, x2, y3, output="device")
    assert is_device_array(on_device.grad) and is_device_array(on_device.y)
    host = mlo.hypergrad(dev, x2, y3)
    assert isinstance(host.grad, np.ndarray)
    np.testing.assert_array_equal(on_device.grad.copy_to_host(), host.grad)
    assert is_device_array(mlo.solve_lower(dev, x2, y3, output="device").y)
