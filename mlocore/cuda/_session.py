"""One device call's state, shared by every "one large problem" entry point of the CUDA
backend: the backend check, the two counted oracles, transfers, the joint vector, the lower
Hessian operator ``H_yy`` and the result's counts."""
from __future__ import annotations

import math

import numpy as np

from .._problem import BilevelProblem, MultilevelProblem
from .._results import add_counts, new_counts
from .._validation import check_backend
from . import _linalg as dl
from ._device import Transfers, to_device, to_host
from ._problem import DeviceBilevelProblem, DeviceOracle

__all__ = ["check_problem_backend"]


def check_problem_backend(problem, backend, where):
    """Resolve the backend of a bilevel entry point for ``problem`` (only ever called for a
    DeviceBilevelProblem or backend "cuda"): a DeviceBilevelProblem runs on "cuda" (the
    default when backend is None); mixing device callbacks and the CPU, or CPU callbacks and
    the GPU, is a TypeError."""
    device_problem = isinstance(problem, DeviceBilevelProblem)
    resolved = check_backend("cuda" if backend is None and device_problem else backend, where)
    if device_problem and resolved != "cuda":
        raise TypeError(f"{where}: a DeviceBilevelProblem has device callbacks and runs on the "
                        f"CUDA backend only, got backend={backend!r}; pass backend='cuda' (or "
                        "leave it None), or build an mlocore.BilevelProblem for the CPU")
    if not device_problem:
        if isinstance(problem, BilevelProblem):
            raise TypeError(f"{where}: backend='cuda' needs device callbacks: a "
                            "mlocore.cuda.DeviceBilevelProblem (e.g. from "
                            "mlocore.problems.cuda_callbacks), got an mlocore.BilevelProblem "
                            "(CPU callbacks); use backend='cpu' for it")
        if isinstance(problem, MultilevelProblem):
            raise TypeError(f"{where}: backend='cuda' needs device callbacks: a "
                            "mlocore.cuda.DeviceMultilevelProblem (e.g. from "
                            "mlocore.problems.cuda_multilevel), got an "
                            "mlocore.MultilevelProblem (CPU callbacks); use backend='cpu' "
                            "for it")
        raise TypeError(f"{where}: problem must be a DeviceBilevelProblem for backend='cuda', "
                        f"got {type(problem).__name__}")
    return resolved


class _Session:
    """One call's device state: transfers, oracle counters, the two oracles, sizes."""

    def __init__(self, problem):
        self.problem = problem
        self.dx, self.dy = problem.dx, problem.dy
        self.n = self.dx + self.dy
        self.counter = Transfers()
        self.counts = new_counts()
        # finite-sum objectives (n_samples) are solved on the full batch, as on the CPU
        self.upper = DeviceOracle(problem.upper.full_batch(), "upper", self.counts,
                                  self.counter, self.n, self.dx)
        self.lower = DeviceOracle(problem.lower.full_batch(), "lower", self.counts,
                                  self.counter, self.n, self.dx)
        self.scalars = dl.Scalars(self.counter)

    def joint(self, x, y):
        """A new joint device vector ``z = concat(x, y)`` (x, y device vectors)."""
        z = dl.empty(self.n)
        dl.copy(x, z[:self.dx])
        dl.copy(y, z[self.dx:])
        return z

    def check_once(self, z):
        if not self.problem._checked:
            self.upper.check_at(z, self.dx)
            self.lower.check_at(z, self.dx)
            self.problem._checked = True

    def norm(self, a) -> float:
        """``|a|`` on the host (one counted read-back)."""
        self.scalars.dot(a, a, dl.S_AUX)
        return math.sqrt(self.scalars.read()[dl.S_AUX])

    def to_output(self, a, output):
        return to_host(a, self.counter) if output == "numpy" else a

    def finish(self, out):
        """Fill a hypergradient result's oracle counts (``oracle_calls``, ``ngrad``,
        ``nhvp``) and ``transfers`` from this session; returns it."""
        add_counts(out, self.counts)
        out.transfers = self.counter.as_dict()
        return out


class _HyyOperator(dl.DeviceOperator):
    """``p -> H_yy(z) p``: the lower ``hvp_yy`` block when given, else the lower joint hvp
    with direction ``(0, p)``, block y (:meth:`DeviceOracle.hvp_yy`)."""

    def __init__(self, sess, z):
        super().__init__(None, sess.dy, name="lower.hvp_yy" if "hvp_yy" in sess.lower.blocks
                         else "lower.hvp")
        self.sess, self.z = sess, z

    def apply(self, p, out):
        self.n_matvec += 1
        self.sess.lower.hvp_yy(self.z, p, out)


def _inputs(sess, x, y, yname):
    """x and y on the device (host arrays validated and copied once each, counted)."""
    xd = to_device("x", x, sess.counter, sess.dx)
    yd = to_device(yname, y, sess.counter, sess.dy)
    return xd, yd


def _host_x(x, xd):
    """The result's x: a NumPy copy of a host x; a device x as given (no transfer)."""
    return xd if xd is x else np.array(x, dtype=np.float64)
