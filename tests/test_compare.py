"""mlocore.compare_methods: equal sample budgets, runs identical to direct minimize_bilevel
calls, reproducible from seeds, the table and the plot."""
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import mlocore as mlo
from mlocore.problems import make_quadratic

BUDGET = 30000
BATCH = 8
METHODS = ["soba", "vrbo", "bsa", "det-aid", "det-alternating"]


@pytest.fixture(scope="module")
def quad():
    return make_quadratic(dx=3, dy=5, n_outer=40, n_inner=60, seed=0)


@pytest.fixture(scope="module")
def start():
    return np.zeros(3), np.zeros(5)


@pytest.fixture(scope="module")
def comp(quad, start):
    x0, y0 = start
    return mlo.compare_methods(quad, x0, y0, METHODS, budget=BUDGET, seeds=2,
                               batch_size=BATCH)


def _samples(res, quad):
    """Oracle samples of a run: the stochastic driver's count, or full-batch calls times
    n_samples of their level."""
    if "oracle_samples" in res:
        return sum(res.oracle_samples.values())
    up = sum(v for k, v in res.oracle_calls.items() if k.startswith("upper"))
    return up * quad.n_outer + (sum(res.oracle_calls.values()) - up) * quad.n_inner


def test_runs_are_the_direct_minimize_bilevel_runs(comp, quad, start):
    x0, y0 = start
    assert comp.F_star == quad.F_star
    assert comp.metrics() == ["F", "dist_to_x_star", "grad_norm_sq"]
    for label in METHODS:
        for run in comp.runs[label]:
            ref = {"reference": quad} if run.stochastic else {}
            res = mlo.minimize_bilevel(run.problem, x0, y0, **ref, **run.settings)
            assert np.array_equal(res.x, run.result.x)
            assert run.samples == _samples(res, quad)
            if run.stochastic:
                assert run.problem is quad.stochastic_problem
                assert run.settings["seed"] == run.seed and run.settings["batch_size"] == BATCH
                for key in ("samples", "iteration"):
                    assert np.array_equal(run.trace[key], res.history[key])
                # checkpoints: the iterates; the last point: the returned (averaged) x
                for key in ("F", "dist_to_x_star"):
                    assert np.array_equal(run.trace[key][:-1], res.history[key][:-1])
                assert run.trace["F"][-1] == quad.F(res.x)
                assert run.trace["dist_to_x_star"][-1] == np.linalg.norm(res.x - quad.x_star)
            else:
                assert run.problem is quad.problem and run.seed is None
                h = res.history  # per-level cumulative calls, all calls of the iteration
                assert np.array_equal(h["upper_calls"] + h["lower_calls"], h["oracle_calls"])
                assert h["upper_calls"][0] > 0 and np.all(np.diff(h["lower_calls"]) > 0)
                assert run.trace["dist_to_x_star"][-1] == np.linalg.norm(res.x - quad.x_star)
                assert run.trace["F"][-1] == quad.F(res.x)
    summ = comp.summary()
    for label in METHODS:
        F = [quad.F(r.result.x) - quad.F_star for r in comp.runs[label]]
        assert summ[label]["F_mean"] == pytest.approx(np.mean(F), rel=1e-12, abs=1e-15)
        assert summ[label]["runs"] == (2 if label[:4] != "det-" else 1)


def test_equal_budgets(comp, quad, start):
    x0, y0 = start
    for label in METHODS:
        for run in comp.runs[label]:
            assert run.samples <= BUDGET
            assert run.trace["samples"][-1] <= BUDGET
    # SOBA: 5 oracle calls of 8 samples per iteration; it gets exactly the iterations that fit
    for run in comp.runs["soba"]:
        assert run.result.nit == BUDGET // (5 * BATCH)
    # the iterations are the most that fit: one more exceeds the budget
    for label in ("soba", "det-alternating"):
        run = comp.runs[label][0]
        more = dict(run.settings, maxiter=run.settings["maxiter"] + 1)
        assert _samples(mlo.minimize_bilevel(run.problem, x0, y0, **more), quad) > BUDGET
    # variable costs per iteration (random Neumann terms, full refreshes): near the budget
    for label in ("vrbo", "bsa"):
        assert all(r.samples > 0.9 * BUDGET for r in comp.runs[label])
    # the costlier iterations get fewer of them
    assert comp.runs["vrbo"][0].result.nit < comp.runs["soba"][0].result.nit
    # AID-BiO converges (to tol) well within the budget and stops there
    det = comp.runs["det-aid"][0]
    assert det.result.status == 0 and det.samples < BUDGET
    assert det.trace["dist_to_x_star"][-1] < 1e-5


def test_reproducible_from_seeds(quad, start):
    x0, y0 = start
    x0c, y0c = x0.copy(), y0.copy()
    kw = dict(budget=4000, seeds=[5, 6], batch_size=BATCH)
    a = mlo.compare_methods(quad, x0, y0, ["soba", "bsa"], **kw)
    b = mlo.compare_methods(quad, x0, y0, ["soba", "bsa"], **kw)
    assert np.array_equal(x0, x0c) and np.array_equal(y0, y0c)
    for label in ("soba", "bsa"):
        for ra, rb in zip(a.runs[label], b.runs[label]):
            assert ra.seed == rb.seed
            for key in ("samples", "F", "dist_to_x_star"):
                assert np.array_equal(ra.trace[key], rb.trace[key])
        r5, r6 = a.runs[label]
        assert not np.array_equal(r5.trace["dist_to_x_star"], r6.trace["dist_to_x_star"])


def test_options_reach_the_methods(quad, start):
    x0, y0 = start
    c = mlo.compare_methods(quad, x0, y0, ["soba", "stocbio"], budget=3000, seeds=1,
                            batch_size=BATCH, inner_step=0.05,
                            options={"soba": {"step": 0.02, "batch_size": 4}})
    soba, stocbio = c.runs["soba"][0], c.runs["stocbio"][0]
    assert soba.settings["step"] == 0.02 and soba.settings["batch_size"] == 4
    assert soba.result.steps["alpha"].initial == 0.02
    assert soba.result.batch_size == (4, 4)
    for run in (soba, stocbio):
        assert run.settings["inner_step"] == 0.05
        assert run.result.steps["beta"].initial == 0.05
    assert "step" not in stocbio.settings and stocbio.settings["batch_size"] == BATCH
    # "aid" is the stochastic AID, also at the default batch size (min(64, n_samples))
    aid = mlo.compare_methods(quad, x0, y0, ["aid"], budget=3000, seeds=1).runs["aid"][0]
    assert aid.stochastic and aid.result.batch_size == (quad.n_outer, quad.n_inner)
    assert "oracle_samples" in aid.result and aid.samples <= 3000


def test_references_and_plain_problems(quad, start):
    x0, y0 = start
    kw = dict(budget=2000, seeds=1, batch_size=BATCH)
    by_point = mlo.compare_methods(quad, x0, y0, ["soba"], reference=quad.x_star, **kw)
    assert by_point.metrics() == ["dist_to_x_star"] and by_point.F_star is None
    run = by_point.runs["soba"][0]
    assert run.final["dist_to_x_star"] == np.linalg.norm(run.result.x - quad.x_star)
    by_F = mlo.compare_methods(quad, x0, y0, ["soba"], reference=quad.F, **kw)
    assert by_F.metrics() == ["F"] and by_F.runs["soba"][0].final["F"] == quad.F(run.result.x)
    plain = mlo.compare_methods(quad.stochastic_problem, x0, y0, ["soba"], **kw)
    assert plain.metrics() == [] and plain.runs["soba"][0].samples <= 2000
    assert np.array_equal(plain.runs["soba"][0].result.x, run.result.x)
    assert "soba" in plain.table()
    with pytest.raises(ValueError, match="no 'dist_to_x_star' in the traces"):
        plain.plot(y="dist")


def test_table(comp):
    text = comp.table()
    summ = comp.summary()
    lines = {line.split()[0]: line for line in text.splitlines()[2:-1]}
    assert list(lines) == METHODS
    for label in METHODS:
        s = summ[label]
        assert f"{s['dist_to_x_star_mean']:.4e} +- {s['dist_to_x_star_std']:.1e}" in lines[label]
        assert lines[label].endswith(f"{s['ok']}/{s['runs']}")
    assert "budget 30,000 oracle samples" in text and str(comp) == text


def test_plot(comp):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2)
    assert comp.plot(ax=a1) is a1
    assert len(a1.lines) == len(METHODS) and a1.get_yscale() == "log"
    assert a1.get_ylabel() == "|x - x*|"
    comp.plot(ax=a2, x="time", y="F")
    assert a2.get_xlabel() == "time (s)" and a2.get_ylabel() == "F - F*"
    # the line of a seeded method is the mean over its seeds
    xs, ys = a1.lines[0].get_data()
    runs = comp.runs["soba"]
    expect = np.mean([np.interp(xs, r.trace["samples"], r.trace["dist_to_x_star"])
                      for r in runs], axis=0)
    np.testing.assert_allclose(ys, expect, rtol=1e-12)
    plt.close(fig)
    with pytest.raises(ValueError, match="x must be"):
        comp.plot(x="iterations")


def test_plot_without_matplotlib(comp, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        comp.plot()


@pytest.mark.parametrize("kw, err, match", [
    (dict(methods=["sobaa"]), ValueError, "unknown method 'sobaa'"),
    (dict(methods=["aid-det"]), ValueError, "unknown method"),
    (dict(methods=["soba", "soba"]), ValueError, "repeated"),
    (dict(methods=[]), ValueError, "empty"),
    (dict(methods="soba"), TypeError, "list of method names"),
    (dict(budget=0), ValueError, "budget must be a positive whole number"),
    (dict(budget=10.5), ValueError, "got 10.5"),
    (dict(budget="1e4"), ValueError, "budget"),
    (dict(seeds=0), ValueError, "seeds"),
    (dict(seeds=[1, 1]), ValueError, "distinct"),
    (dict(options={"saba": {"step": 1.0}}), ValueError, "not among the methods"),
    (dict(options={"soba": {"maxiter": 5}}), ValueError, "sets 'maxiter' itself"),
    (dict(seed=3), ValueError, "sets 'seed' itself"),
    (dict(budget=30), ValueError, "below one iteration of method 'soba'"),
    (dict(reference=object()), TypeError, "reference must be"),
])
def test_bad_input(quad, start, kw, err, match):
    x0, y0 = start
    args = dict(methods=["soba"], budget=1000, seeds=1, batch_size=BATCH)
    args.update(kw)
    methods = args.pop("methods")
    with pytest.raises(err, match=match):
        mlo.compare_methods(quad, x0, y0, methods, **args)


def test_bad_problem(start):
    with pytest.raises(TypeError, match="problem must be an mlocore.BilevelProblem"):
        mlo.compare_methods(object(), *start, ["soba"], budget=1000)


def test_constrained_problem_object(quad, start):
    x0, y0 = start
    box = dict(dims=(3, 5), bounds=(-0.3, 0.3))
    obj = SimpleNamespace(
        problem=mlo.BilevelProblem(quad.problem.upper, quad.problem.lower, **box),
        stochastic_problem=mlo.BilevelProblem(quad.stochastic_problem.upper,
                                              quad.stochastic_problem.lower, **box),
        F=quad.F, hypergrad=quad.hypergrad)
    c = mlo.compare_methods(obj, x0, y0, ["soba", "det-aid"], budget=10000, seeds=1,
                            batch_size=BATCH)
    assert c.metrics() == ["F", "grad_norm_sq", "grad_mapping_sq"]
    assert "|x - P(x - grad F)|^2" in c.table() and "|grad F|^2" not in c.table()
    for label in ("soba", "det-aid"):
        run = c.runs[label][0]
        x = run.result.x
        assert np.all(np.abs(x) <= 0.3)
        gm = x - np.clip(x - quad.hypergrad(x), -0.3, 0.3)
        assert run.final["grad_mapping_sq"] == pytest.approx(gm @ gm, rel=1e-12)


def test_budget_with_step_halvings(quad, start, monkeypatch):
    """Default steps that diverge: the run halves them and resumes from a checkpoint (the
    discarded work counts); it is stopped at its last checkpoint within the budget."""
    from mlocore.stochastic import _driver
    lipschitz = _driver._CpuRun.lipschitz
    monkeypatch.setattr(_driver._CpuRun, "lipschitz",
                        lambda self, which: lipschitz(self, which) / 40.0)
    x0, y0 = start
    c = mlo.compare_methods(quad, x0, y0, ["soba"], budget=20000, seeds=2, batch_size=BATCH)
    for run in c.runs["soba"]:
        assert run.halvings > 0 and run.result.status == 99 and run.ok
        assert run.samples <= 20000
        res = mlo.minimize_bilevel(run.problem, x0, y0, reference=quad, **run.settings)
        assert np.array_equal(res.x, run.result.x) and _samples(res, quad) == run.samples
        d = run.trace["dist_to_x_star"]  # ends at the returned (tail-averaged) x
        assert np.array_equal(res.history["dist_to_x_star"][:-1], d[:-1])
        assert d[-1] == np.linalg.norm(res.x - quad.x_star)
        # without the stop, the run goes on past the budget
        free = {k: v for k, v in run.settings.items() if k != "callback"}
        assert _samples(mlo.minimize_bilevel(run.problem, x0, y0, **free), quad) > 20000
    assert "default steps halved after a divergence" in c.table()


def test_budget_spent_on_discarded_runs(quad, start, monkeypatch):
    """A method whose halvings discard the whole budget before a kept checkpoint: back at
    x0, counted as failed (the probes are stand-ins with that history)."""
    from scipy.optimize import OptimizeResult
    from mlocore import compare

    def probe(self, seed, M, reference, **extra):
        diverged = "backtrack" in extra  # the probe without halvings diverges at once
        hist = {"iteration": np.array([0] if diverged else [0, 10]),
                "samples": np.array([0] if diverged else [0, 5000])}
        return OptimizeResult(history=hist, status=13 if diverged else 20,
                              oracle_samples={"lower_grad": 400 if diverged else 5000},
                              step_reductions=0 if diverged else 6), M

    monkeypatch.setattr(compare._StochasticPlan, "_probe", probe)
    x0, y0 = start
    c = mlo.compare_methods(quad, x0, y0, ["soba"], budget=3000, seeds=1, batch_size=BATCH)
    run = c.runs["soba"][0]
    assert run.spent and not run.ok and run.halvings == 6 and run.samples == 3000
    assert np.array_equal(run.result.x, x0) and run.settings["maxiter"] == 0
    assert "seed 0 6x (all the budget discarded: failed)" in c.table()
    assert c.summary()["soba"]["ok"] == 0
