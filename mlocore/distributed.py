"""Many problems at once: :func:`minimize_many` and :func:`hypergrad_many`.

Each param of a list is turned into a problem by a user function ``build(param)`` and solved
by :func:`mlocore.minimize_bilevel` / :func:`mlocore.minimize_multilevel` (or
:func:`mlocore.hypergrad`), serially in the calling process or on a Dask cluster
(``pip install "mlocore[dask]"``). Dask is imported lazily: ``import mlocore.distributed``
works without it.

On a cluster:

- ``build`` and the solver options are serialized once, sent to every worker once
  (``client.scatter(..., broadcast=True)``) and unpickled once per worker, where they are
  memoized by a hash of their bytes (:data:`_WORKER_JOBS`): the callbacks of a problem are
  compiled once per worker process (then numba's disk cache makes later processes fast),
  not once per task. Large shared data goes the same way with ``data=``
  (``build(param, data)``).
- Params are grouped into chunks (one Dask task each) to amortize the per-task overhead.
- Results stream back as chunks finish (``as_completed``); with ``store=`` each one is
  written to disk at once (by the calling process), and a rerun with the same store loads
  what is done.
- A worker that dies costs only its unfinished chunks: Dask reschedules them on the other
  workers; a chunk whose workers died more often than the scheduler's ``allowed-failures``
  gives failed results for its params.

Errors:

- A problem that fails (``build`` raises, the solver raises) gives its own result with
  ``success=False``, ``status=-1``, ``fun=nan``, ``x=None`` and a message that names the
  param and the exception (``res.traceback`` holds the traceback); the others go on.
- A ``build`` that returns something malformed (not a tuple, a wrong arity, not a problem)
  is a programming error: a :class:`ValueError` naming the param is raised, in serial mode
  and on a cluster alike (the remaining tasks are cancelled; finished results are kept in
  the store).
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import sys
import tempfile
import traceback
import uuid
import warnings
from collections import OrderedDict

import numpy as np
from scipy.optimize import OptimizeResult

from ._hypergrad import hypergrad
from ._minimize import minimize_bilevel, minimize_multilevel
from ._problem import BilevelProblem, MultilevelProblem
from ._validation import check_int

__all__ = ["minimize_many", "hypergrad_many"]

_DASK_HINT = 'pip install "mlocore[dask]"'
_KINDS = ("minimize", "hypergrad")


def _import_distributed():
    """The ``dask.distributed`` module (lazily; raises ImportError without dask)."""
    import dask.distributed
    return dask.distributed


# ---------------------------------------------------------------------------------------
# One problem: build, check, solve (the same code serially and on a worker)
# ---------------------------------------------------------------------------------------
class _MalformedBuild(Exception):
    """build(param) returned something that is not a problem tuple."""


def _describe_param(param):
    text = repr(param)
    return text if len(text) <= 200 else text[:197] + "..."


def _unpack(built, param, kind):
    """Check ``build``'s return value; returns ``(problem, args, multilevel)``."""
    p = _describe_param(param)
    bilevel_form = "(problem, x, y)" if kind == "hypergrad" else "(problem, x0, y0)"
    multi_form = "(problem, xs)" if kind == "hypergrad" else "(problem, x0s)"
    expected = (f"a tuple {bilevel_form} for a BilevelProblem or {multi_form} for a "
                "MultilevelProblem")
    if not isinstance(built, tuple):
        raise _MalformedBuild(f"build({p}) returned a {type(built).__name__}; expected "
                              f"{expected}")
    if len(built) not in (2, 3):
        raise _MalformedBuild(f"build({p}) returned a tuple of length {len(built)}; "
                              f"expected {expected}")
    problem = built[0]
    multilevel = isinstance(problem, MultilevelProblem) or \
        bool(getattr(problem, "device_multilevel", False))
    bilevel = isinstance(problem, BilevelProblem) or bool(getattr(problem, "on_device", False))
    if not (multilevel or bilevel):
        raise _MalformedBuild(f"build({p}) returned a tuple whose first item is a "
                              f"{type(problem).__name__}; expected {expected}")
    if multilevel and len(built) != 2:
        raise _MalformedBuild(f"build({p}) returned a MultilevelProblem with "
                              f"{len(built) - 1} more items; expected {multi_form}")
    if bilevel and len(built) != 3:
        raise _MalformedBuild(f"build({p}) returned a BilevelProblem with "
                              f"{len(built) - 1} more item; expected {bilevel_form}")
    return problem, built[1:], multilevel


def _failed(param, stage, exc):
    return OptimizeResult(
        x=None, fun=np.nan, success=False, status=-1,
        message=f"param {_describe_param(param)}: {stage} raised {type(exc).__name__}: {exc}",
        param=param, traceback="".join(traceback.format_exception(type(exc), exc,
                                                                  exc.__traceback__)))


def _raised(res):
    """Whether ``res`` is the failed result of a build or solver that raised."""
    return res.get("status") == -1 and "traceback" in res


def _solve_one(kind, build, options, param, with_data, data):
    """``("ok", result)`` or ``("malformed", message)`` for one param."""
    try:
        built = build(param, data) if with_data else build(param)
    except Exception as exc:  # a failing problem is its own failed result
        return "ok", _failed(param, "build", exc)
    try:
        problem, args, multilevel = _unpack(built, param, kind)
    except _MalformedBuild as exc:
        return "malformed", str(exc)
    try:
        if kind == "hypergrad":
            res = hypergrad(problem, *args, **options)
        elif multilevel:
            res = minimize_multilevel(problem, *args, **options)
        else:
            res = minimize_bilevel(problem, *args, **options)
    except Exception as exc:
        name = "hypergrad" if kind == "hypergrad" else \
            "minimize_multilevel" if multilevel else "minimize_bilevel"
        return "ok", _failed(param, name, exc)
    res.param = param
    return "ok", res


def _run_chunk(kind, build, options, items, with_data, data):
    out = []
    for index, param in items:
        tag, value = _solve_one(kind, build, options, param, with_data, data)
        out.append((index, tag, value))
        if tag == "malformed":
            break
    return out


#: Per-worker memo: hash of the serialized (build, options) -> the unpickled pair. Keeping
#: the same objects alive across tasks and runs keeps their compiled callbacks warm.
_WORKER_JOBS: "OrderedDict[str, tuple]" = OrderedDict()
_WORKER_JOBS_MAX = 8


def _worker_job(token, blob):
    job = _WORKER_JOBS.get(token)
    if job is None:
        job = pickle.loads(blob)
        _WORKER_JOBS[token] = job
        while len(_WORKER_JOBS) > _WORKER_JOBS_MAX:
            _WORKER_JOBS.popitem(last=False)
    else:
        _WORKER_JOBS.move_to_end(token)
    return job


def _run_chunk_on_worker(kind, token, blob, items, with_data, data):
    build, options = _worker_job(token, blob)
    return _run_chunk(kind, build, options, items, with_data, data)


# ---------------------------------------------------------------------------------------
# Store: one pickle per finished result
# ---------------------------------------------------------------------------------------
class _Store:
    """A directory with one pickle file per result, named by a hash of (kind, param)."""

    def __init__(self, path, kind):
        self.path = os.fspath(path)
        self.kind = kind
        os.makedirs(self.path, exist_ok=True)

    def file(self, param):
        try:
            key = pickle.dumps(param, protocol=4)
        except Exception as exc:
            raise TypeError(f"store= needs picklable params; param {_describe_param(param)} "
                            f"cannot be pickled: {exc}") from None
        digest = hashlib.sha256(self.kind.encode() + b"\0" + key).hexdigest()[:24]
        return os.path.join(self.path, f"{self.kind}-{digest}.pkl"), key

    def load(self, param):
        path, key = self.file(param)
        if not os.path.exists(path):
            return None
        try:
            with open(path, "rb") as fh:
                stored_key, res = pickle.load(fh)
        except Exception as exc:  # unreadable (another version, truncated by hand): redo
            warnings.warn(f"store file {path} cannot be read ({type(exc).__name__}: {exc}); "
                          "solving its param again", stacklevel=4)
            return None
        return res if stored_key == key else None

    def save(self, param, res):
        path, key = self.file(param)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pkl", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump((key, res), fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


# ---------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, enabled, total, name):
        self.enabled, self.total, self.name = enabled, total, name
        self.done = 0
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=name)
            except ImportError:
                self.bar = None

    def update(self, res):
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            return
        state = "ok" if res.get("success", False) else "FAILED"
        print(f"{self.name}: {self.done}/{self.total} done (param "
              f"{_describe_param(res.get('param'))}: {state})", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------
def default_chunksize(n_params, n_workers):
    """Chunks of about ``n_params / (4 n_workers)`` params: four chunks per worker balance
    the load while keeping the per-task overhead small."""
    return max(1, math.ceil(n_params / (4 * max(1, n_workers))))


def _resolve_client(client):
    """``(mode, client, owned_cluster)`` with mode "serial" or "dask"."""
    if isinstance(client, str):
        if client != "serial":
            raise ValueError(f'client must be None, "serial" or a dask.distributed.Client, '
                             f"got {client!r}")
        return "serial", None, None
    try:
        dd = _import_distributed()
    except ImportError:
        if client is None:
            warnings.warn(f"dask is not installed: solving serially ({_DASK_HINT} to use a "
                          "local cluster)", stacklevel=4)
            return "serial", None, None
        raise ImportError(f"client={type(client).__name__} needs dask.distributed: "
                          f"{_DASK_HINT}") from None
    if client is None:
        cluster = dd.LocalCluster(processes=True, threads_per_worker=1,
                                  n_workers=os.cpu_count() or 1)
        return "dask", dd.Client(cluster), cluster
    if not isinstance(client, dd.Client):
        raise TypeError(f'client must be None, "serial" or a dask.distributed.Client, got '
                        f"{type(client).__name__}")
    return "dask", client, None


def _many(kind, build, params, client, store, progress, chunksize, data, retries, options):
    if not callable(build):
        raise TypeError(f"build must be callable, got {type(build).__name__}")
    if isinstance(params, (str, bytes)):
        raise TypeError("params must be a sequence of params, got a string")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of params, got "
                        f"{type(params).__name__}") from None
    chunksize = check_int("chunksize", chunksize, 1, allow_none=True)
    retries = 0 if retries is None else check_int("retries", retries, 0)
    with_data = data is not None
    name = f"{kind}_many"
    results = [None] * len(params)
    st = None if store is None else _Store(store, kind)
    todo = []
    for i, param in enumerate(params):
        res = None if st is None else st.load(param)
        if res is None:
            todo.append((i, param))
        else:
            res.param = param
            results[i] = res
    bar = _Progress(bool(progress), len(params), name)
    for res in results:
        if res is not None:
            bar.update(res)

    def finish(entries):
        for index, tag, value in entries:
            if tag == "malformed":
                raise ValueError(value)
            results[index] = value
            if st is not None and not _raised(value):
                st.save(value.param, value)
            bar.update(value)

    try:
        if todo:
            mode, cl, cluster = _resolve_client(client)
            if mode == "serial":
                for item in todo:
                    finish(_run_chunk(kind, build, options, [item], with_data, data))
            else:
                try:
                    _run_dask(kind, build, options, todo, cl, chunksize, with_data, data,
                              retries, finish)
                finally:
                    if cluster is not None:
                        cl.close()
                        cluster.close()
    finally:
        bar.close()
    return results


def _run_dask(kind, build, options, todo, client, chunksize, with_data, data, retries,
              finish):
    dd = _import_distributed()
    try:
        import cloudpickle
        blob = cloudpickle.dumps((build, options), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"build and the solver options must be picklable to run on a "
                        f"cluster; pickling failed: {type(exc).__name__}: {exc}") from None
    token = hashlib.sha256(blob).hexdigest()
    n_workers = max(1, sum(client.nthreads().values()))
    size = chunksize or default_chunksize(len(todo), n_workers)
    run_id = uuid.uuid4().hex[:12]
    # scattered in a list so that a dict or a list is sent as one object (scatter splits
    # containers), under a fresh key (hash=False) so that runs never share or release
    # each other's data
    blob_f = client.scatter([blob], broadcast=True, hash=False)[0]
    data_f = client.scatter([data], broadcast=True, hash=False)[0] if with_data else None
    chunks = {}
    for s in range(0, len(todo), size):
        fut = client.submit(_run_chunk_on_worker, kind, token, blob_f, todo[s:s + size],
                            with_data, data_f, key=f"mlocore-{kind}-many-{run_id}-{s // size}",
                            retries=retries, pure=False)
        chunks[fut.key] = (fut, todo[s:s + size])
    futures = [fut for fut, _ in chunks.values()]
    try:
        for fut in dd.as_completed(futures):
            if fut.status == "error":
                # the task itself failed (e.g. its worker died more often than the scheduler
                # allows): each param of the chunk gets a failed result
                exc = fut.exception()
                finish([(index, "ok", _failed(param, "its Dask task", exc))
                        for index, param in chunks[fut.key][1]])
            else:
                finish(fut.result())
            fut.release()
    finally:
        client.cancel(futures)
        del blob_f, data_f


def minimize_many(build, params, *, client=None, store=None, progress=False, chunksize=None,
                  data=None, retries=2, **options):
    """Solve one optimization problem per param, serially or on a Dask cluster.

    Parameters
    ----------
    build : callable
        ``build(param)`` (``build(param, data)`` with ``data=``) returns ``(problem, x0, y0)``
        for a :class:`mlocore.BilevelProblem` (solved by :func:`mlocore.minimize_bilevel`) or
        ``(problem, x0s)`` for a :class:`mlocore.MultilevelProblem`
        (:func:`mlocore.minimize_multilevel`). On a cluster it must be picklable (a module
        function the workers can import, or one cloudpickle serializes by value).
    params : iterable
        One problem per param (any picklable values).
    client : None, "serial" or dask.distributed.Client
        None: start a local cluster (``LocalCluster(processes=True, threads_per_worker=1,
        n_workers=os.cpu_count())``) and close it at the end; without dask installed, solve
        serially with a warning. "serial": in the calling process. A Client: on its cluster.
        Results are the same bit for bit in every mode.
    store : str or path, optional
        A directory: each result is written at once to its own pickle file (named by a hash
        of the param; temp file + ``os.replace``); params found there are loaded, not solved
        again. Results of problems whose build or solver raised are not stored (a rerun
        retries them). A store belongs to one ``build`` and one set of options.
    progress : bool
        Show progress (tqdm when installed, else one line per result on stderr).
    chunksize : int, optional
        Params per Dask task (default about ``len(params) / (4 workers)``).
    data : object, optional
        Shared data, sent once to every worker and passed as ``build(param, data)``.
    retries : int
        Dask retries of a task that raised unexpectedly (a worker that dies is rescheduled
        by Dask itself).
    **options
        Options of the solver.

    Returns
    -------
    list of scipy.optimize.OptimizeResult
        In the order of ``params``, each with ``res.param``. A problem whose build or solver
        raised has ``success=False``, ``status=-1`` and a message naming the param.

    Raises
    ------
    ValueError
        ``build`` returned something malformed (the message names the param).
    ImportError
        A Dask client was asked for and dask is not installed.
    """
    return _many("minimize", build, params, client, store, progress, chunksize, data,
                 retries, options)


def hypergrad_many(build, params, *, client=None, store=None, progress=False, chunksize=None,
                   data=None, retries=2, **options):
    """One :func:`mlocore.hypergrad` per param, serially or on a Dask cluster.

    ``build(param)`` returns ``(problem, x, y)`` for a bilevel problem or ``(problem, xs)``
    for a multilevel one; ``options`` go to :func:`mlocore.hypergrad`. Every other argument,
    the result list and the errors are as in :func:`minimize_many`.
    """
    return _many("hypergrad", build, params, client, store, progress, chunksize, data,
                 retries, options)
