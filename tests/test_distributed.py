"""mlocore.distributed: many problems serially and on a real two-worker local Dask cluster.

The builders are module-level functions of this module, which the workers import by name
(they inherit the test process's sys.path); their problems use the problem library's cached
``@njit(cache=True)`` callbacks.
"""
import os
import signal
import warnings

import numpy as np
import pytest

import mlocore
import mlocore.distributed as mld
from mlocore.problems import make_nlevel_quadratic, make_quadratic


# -- builders (imported by the workers) ---------------------------------------------------
def build_quad(seed):
    q = make_quadratic(dx=2, dy=3, n_outer=4, n_inner=6, seed=seed)
    return q.problem, np.full(2, 0.1 * seed), np.zeros(3)


def build_tri(seed):
    m = make_nlevel_quadratic(n=3, dims=(1, 2, 2), seed=seed)
    return m.problem, [np.zeros(1), np.zeros(2), np.zeros(2)]


def build_quad_data(seed, data):
    """Shared data: the seed offset and the x0 scale."""
    problem, x0, y0 = build_quad(seed + data["offset"])
    return problem, data["scale"] * x0, y0


def build_counted(seed, calls_dir):
    """Records every call as one file in ``calls_dir``."""
    import uuid
    open(os.path.join(calls_dir, f"{seed}-{uuid.uuid4().hex}"), "w").close()
    return build_quad(seed)


def build_killer(seed, marker):
    """Kills its own worker process the first time seed 3 is built (the marker file tells
    later attempts, and the serial reference run, not to)."""
    if seed == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return build_quad(seed)


def build_always_killer(seed):
    """Kills its worker process at every attempt."""
    os.kill(os.getpid(), signal.SIGKILL)


def build_failing(seed):
    if seed == 2:
        raise RuntimeError("no data for this fold")
    problem, x0, y0 = build_quad(seed)
    if seed == 3:
        return problem, np.zeros(5), y0  # wrong x0 shape: the solver raises
    return problem, x0, y0


def build_malformed(kind):
    problem, x0, y0 = build_quad(0)
    if kind == "list":
        return [problem, x0, y0]
    if kind == "arity":
        return problem, x0
    if kind == "not-a-problem":
        return "problem", x0, y0
    return problem, x0, y0


SEEDS = list(range(6))
OPTS = dict(method="aid", maxiter=60, tol=1e-7)
HG_OPTS = dict(method="cg", tol=1e-10)
ML_OPTS = dict(method="exact", maxiter=5)


@pytest.fixture(scope="module")
def client():
    dd = pytest.importorskip("dask.distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = dd.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None)
    cl = dd.Client(cluster)
    yield cl
    cl.close()
    cluster.close()


def _client(request, mode):
    """The module's cluster client for mode "dask" (skipped without dask), else "serial"."""
    return request.getfixturevalue("client") if mode == "dask" else "serial"


def _serial(fn, build, params, **options):
    return fn(build, params, client="serial", **options)


def _same(a, b, attr):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.param == rb.param
        assert ra.success == rb.success, (ra.message, rb.message)
        assert np.array_equal(np.asarray(ra[attr]), np.asarray(rb[attr]))
        assert np.array_equal(ra.fun, rb.fun, equal_nan=True)


def test_workers_import_this_mlocore(client):
    files = client.run(lambda: __import__("mlocore").__file__)
    assert set(files.values()) == {mlocore.__file__}


def test_serial_matches_plain_loop():
    res = mld.minimize_many(build_quad, SEEDS[:3], client="serial", **OPTS)
    for seed, r in zip(SEEDS[:3], res):
        ref = mlocore.minimize_bilevel(*build_quad(seed), **OPTS)
        assert r.param == seed and r.success, r.message
        assert np.array_equal(r.x, ref.x) and r.fun == ref.fun
        # a closed form: x* of the quadratic
        q = make_quadratic(dx=2, dy=3, n_outer=4, n_inner=6, seed=seed)
        assert np.allclose(r.x, q.x_star, atol=1e-6)


@pytest.mark.parametrize("chunksize", [None, 4])
def test_minimize_many_bilevel_equals_serial(client, chunksize):
    ser = _serial(mld.minimize_many, build_quad, SEEDS, **OPTS)
    par = mld.minimize_many(build_quad, SEEDS, client=client, chunksize=chunksize, **OPTS)
    _same(par, ser, "x")
    assert [r.param for r in par] == SEEDS


def test_hypergrad_many_bilevel_equals_serial(client):
    ser = _serial(mld.hypergrad_many, build_quad, SEEDS, **HG_OPTS)
    par = mld.hypergrad_many(build_quad, SEEDS, client=client, **HG_OPTS)
    _same(par, ser, "grad")
    q = make_quadratic(dx=2, dy=3, n_outer=4, n_inner=6, seed=1)
    assert np.allclose(par[1].grad, q.hypergrad(np.full(2, 0.1)), atol=1e-8)


def test_multilevel_equals_serial(client):
    ser = _serial(mld.minimize_many, build_tri, SEEDS[:4], **ML_OPTS)
    par = mld.minimize_many(build_tri, SEEDS[:4], client=client, **ML_OPTS)
    _same(par, ser, "x")
    ser = _serial(mld.hypergrad_many, build_tri, SEEDS[:4])
    par = mld.hypergrad_many(build_tri, SEEDS[:4], client=client)
    _same(par, ser, "grad")
    m = make_nlevel_quadratic(n=3, dims=(1, 2, 2), seed=2)
    assert np.allclose(par[2].grad, m.hypergrad(np.zeros(1)), atol=1e-7)


def test_shared_data_scattered(client):
    data = {"offset": 10, "scale": 2.0, "X": np.ones((300, 30)),
            "folds": [np.arange(50)] * 3}
    ser = mld.minimize_many(build_quad_data, SEEDS[:4], client="serial", data=data, **OPTS)
    par = mld.minimize_many(build_quad_data, SEEDS[:4], client=client, data=data, **OPTS)
    _same(par, ser, "x")
    ref = mlocore.minimize_bilevel(*build_quad_data(1, data), **OPTS)
    assert np.array_equal(par[1].x, ref.x)
    # a dict is sent as one object under a key of its own: later runs with the same data do
    # not lose it when an earlier run's copy is released (they would hang)
    for chunksize in (4, None, 1, 4):
        again = mld.minimize_many(build_quad_data, SEEDS[:4], client=client, data=data,
                                  chunksize=chunksize, **OPTS)
        _same(again, ser, "x")


def test_worker_killed_mid_run(client, tmp_path):
    marker = str(tmp_path / "killed")
    before = set(client.run(os.getpid).values())
    par = mld.minimize_many(build_killer, list(range(8)), client=client, data=marker,
                            chunksize=2, **OPTS)
    assert os.path.exists(marker)  # the kill happened
    client.wait_for_workers(2, timeout=60)
    after = set(client.run(os.getpid).values())
    assert before != after  # a worker was replaced
    ser = mld.minimize_many(build_killer, list(range(8)), client="serial", data=marker, **OPTS)
    _same(par, ser, "x")
    assert all(r.success for r in par)


def test_task_that_always_kills_its_worker_fails_alone(client):
    scheduler = client.cluster.scheduler
    allowed = scheduler.allowed_failures
    scheduler.allowed_failures = 0  # the first death fails the task (default: 3 retries)
    try:
        res = mld.minimize_many(build_always_killer, [7], client=client, **OPTS)
    finally:
        scheduler.allowed_failures = allowed
        client.wait_for_workers(2, timeout=60)
    assert not res[0].success and res[0].param == 7
    assert "param 7: its Dask task raised KilledWorker" in res[0].message


@pytest.mark.parametrize("mode", ["serial", "dask"])
def test_store_resume(request, tmp_path, mode):
    cl = _client(request, mode)
    calls, store = tmp_path / "calls", tmp_path / "store"
    calls.mkdir()
    first = mld.minimize_many(build_counted, SEEDS[1::2], client=cl, store=store,
                              data=str(calls), **OPTS)
    assert len(os.listdir(calls)) == 3
    assert len([f for f in os.listdir(store) if f.endswith(".pkl")]) == 3
    assert not [f for f in os.listdir(store) if f.startswith(".tmp")]
    full = mld.minimize_many(build_counted, SEEDS, client=cl, store=store, data=str(calls),
                             **OPTS)
    built = sorted(int(f.split("-")[0]) for f in os.listdir(calls))
    assert built == [0, 1, 2, 3, 4, 5]  # the stored three were loaded, not built again
    _same(full, _serial(mld.minimize_many, build_quad, SEEDS, **OPTS), "x")
    for r, f in zip(full[1::2], first):
        assert np.array_equal(r.x, f.x) and r.param == f.param
    again = mld.minimize_many(build_counted, SEEDS, client=cl, store=store, data=str(calls),
                              **OPTS)
    assert len(os.listdir(calls)) == 6
    _same(again, full, "x")


def test_store_keeps_unconverged_results_but_not_raised_ones(tmp_path):
    res = mld.minimize_many(build_failing, [1, 2], client="serial", store=tmp_path,
                            method="aid", maxiter=2)
    assert not res[0].success and res[0].status != -1  # maxiter: a finished result
    assert not res[1].success and res[1].status == -1  # build raised
    (name,) = os.listdir(tmp_path)
    stamp = os.stat(tmp_path / name).st_mtime_ns
    again = mld.minimize_many(build_failing, [1], client="serial", store=tmp_path,
                              method="aid", maxiter=2)
    assert np.array_equal(again[0].x, res[0].x) and again[0].nit == res[0].nit == 2
    assert os.stat(tmp_path / name).st_mtime_ns == stamp  # loaded, not solved and rewritten


@pytest.mark.parametrize("mode", ["serial", "dask"])
def test_failing_problem_isolated(request, mode):
    cl = _client(request, mode)
    res = mld.minimize_many(build_failing, [0, 1, 2, 3, 4], client=cl, **OPTS)
    assert [r.success for r in res] == [True, True, False, False, True]
    assert "param 2" in res[2].message and "build raised RuntimeError" in res[2].message
    assert "no data for this fold" in res[2].message
    assert "param 3" in res[3].message and "minimize_bilevel raised" in res[3].message
    assert res[2].param == 2 and res[3].status == -1 and np.isnan(res[3].fun)
    assert "RuntimeError" in res[2].traceback
    ref = mlocore.minimize_bilevel(*build_quad(4), **OPTS)
    assert np.array_equal(res[4].x, ref.x)


@pytest.mark.parametrize("mode", ["serial", "dask"])
@pytest.mark.parametrize("kind, expect", [
    ("list", "returned a list; expected a tuple (problem, x0, y0)"),
    ("arity", "BilevelProblem with 1 more item; expected (problem, x0, y0)"),
    ("not-a-problem", "first item is a str"),
])
def test_malformed_build_raises(request, mode, kind, expect):
    cl = _client(request, mode)
    with pytest.raises(ValueError, match=r"build\('" + kind + r"'\) returned") as info:
        mld.minimize_many(build_malformed, ["ok", kind, "ok"], client=cl, **OPTS)
    assert expect in str(info.value)


def test_malformed_hypergrad_names_its_form():
    with pytest.raises(ValueError, match=r"expected a tuple \(problem, x, y\)"):
        mld.hypergrad_many(build_malformed, ["list"], client="serial")


def test_bad_arguments():
    with pytest.raises(TypeError, match="build must be callable, got int"):
        mld.minimize_many(3, [1], client="serial")
    with pytest.raises(ValueError, match="chunksize must be >= 1, got 0"):
        mld.minimize_many(build_quad, [1], client="serial", chunksize=0)
    with pytest.raises(TypeError, match="retries must be an integer, got 'two'"):
        mld.minimize_many(build_quad, [1], client="serial", retries="two")
    with pytest.raises(ValueError, match="client must be None, \"serial\""):
        mld.minimize_many(build_quad, [1], client="threads")
    with pytest.raises(TypeError, match="params must be an iterable"):
        mld.minimize_many(build_quad, 5, client="serial")
    assert mld.minimize_many(build_quad, [], client="serial") == []


def test_progress_lines(capsys):
    mld.hypergrad_many(build_quad, [0, 1], client="serial", progress=True)
    err = capsys.readouterr().err
    assert "hypergrad_many: 1/2 done (param 0: ok)" in err
    assert "hypergrad_many: 2/2 done (param 1: ok)" in err


def test_without_dask(monkeypatch):
    def no_dask():
        raise ImportError("No module named 'dask'")
    monkeypatch.setattr(mld, "_import_distributed", no_dask)
    with pytest.warns(UserWarning, match=r'dask is not installed: solving serially \(pip '
                                         r'install "mlocore\[dask\]"'):
        res = mld.hypergrad_many(build_quad, [0, 1], **HG_OPTS)
    ref = mlocore.hypergrad(*build_quad(1), **HG_OPTS)
    assert np.array_equal(res[1].grad, ref.grad)
    with pytest.raises(ImportError, match=r'pip install "mlocore\[dask\]"'):
        mld.minimize_many(build_quad, [0], client=object(), **OPTS)
    # the serial mode never needs dask
    assert mld.minimize_many(build_quad, [0], client="serial", **OPTS)[0].success


def test_import_does_not_import_dask():
    import subprocess
    import sys
    code = ("import sys, mlocore, mlocore.distributed; "
            "print(any(m == 'dask' or m.startswith('dask.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(mlocore.__file__)))
    assert out.stdout.strip() == "False"


def test_default_client_starts_and_closes_a_local_cluster(monkeypatch):
    pytest.importorskip("dask.distributed")
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # one worker: a fast start
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the dashboard port is taken
        res = mld.hypergrad_many(build_quad, [0, 1, 2], **HG_OPTS)
    _same(res, _serial(mld.hypergrad_many, build_quad, [0, 1, 2], **HG_OPTS), "grad")
    left = {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE} - children
    assert not left
