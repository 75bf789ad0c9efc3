"""Methods without Hessian inverses: SABA, Hessian-free (PZOBO), value-function penalty and
primal-dual.

Each entry is a :class:`mlocore._stochastic.MethodSpec` (see that module). The kernels are in
:mod:`mlocore._kernels.stoch_free`; the ``setup`` functions below validate the method options
and lay out the kernels' ``work`` / ``fpar`` / ``ipar`` arrays. Their docstrings are the
methods' documentation (numpydoc).
"""

import numpy as np

from ._kernels import stoch_free as _sf
from ._stochastic import MethodSpec
from ._validation import check_choice, check_int, check_positive

__all__ = ["FREE_METHODS", "saba_tables", "MULTIPLIER_INDEX"]

#: position of the primal-dual multiplier in ``res.state["work"]`` (also ``work[dy]``)
MULTIPLIER_INDEX = -1

_SABA_INIT = {"zeros": _sf.SABA_INIT_ZEROS, "full": _sf.SABA_INIT_FULL}


def _setup_saba(ctx, opts):
    """SABA: SOBA with SAGA variance reduction (Dagreou, Ablin, Vaiter & Moreau, "A framework
    for bilevel optimization that enables stochastic and global variance reduction
    algorithms", NeurIPS 2022).

    Iteration (lower batch j and upper batch i drawn independently, each fixed batch visited
    once per epoch in a reshuffled order)::

        y <- y - beta_k  D[grad_y g]
        v <- v - beta_k (D[H_yy v] - D[grad_y f])
        x <- P(x - alpha_k (D[grad_x f] - D[H_xy v]))

    ``D[q] = w_j (q_j(x, y, v) - m_j) + sum_b (|B_b| / n) m_b`` is the SAGA estimate of the
    full-batch quantity q, ``m_j`` the memory row of batch j (overwritten by ``q_j`` after
    use) and ``w_j = n_batches |B_j| / n`` (1 when all batches have the same size; it keeps
    the estimate unbiased when the last batch is shorter). The running means are updated in
    O(d) per step.

    Parameters
    ----------
    memory_init : {"full", "zeros"}, default "full"
        "full": before the first iteration one pass over all batches fills the tables at
        ``(x0, y0, v0 = 0)`` (one epoch of lower gradients, upper gradients and lower cross
        HVPs, counted in ``oracle_calls``); the estimates are then unbiased from the first
        step. "zeros": tables and means start at zero, as in the authors' reference
        implementation (the first epoch's estimates are biased towards zero).

    Notes
    -----
    Assumptions: g strongly convex in y, f and g smooth, **fixed minibatches**
    (``sampler="batches"``, the default; "uniform" is refused). Constant steps (the default
    schedules ``alpha_power = beta_power = 0``) are what SABA's analysis uses: O(1/K)
    stationarity, linear convergence under a PL condition, to the exact solution (no noise
    ball). SAGA-type estimates need a smaller lower step than SOBA, about ``1/(3 L_g)``
    (SAGA's ``1/(3 L)``): ``1/L_g`` diverges on mlocore's stochastic quadratic at batch size
    32 while ``0.3/L_g`` converges linearly; the default lower step is ``1/(3 L_g)``
    (``beta_safety`` in the registry). That is still too large on
    ``make_quadratic(10, 20, 1000, 1000)`` at batch size 64 (the iterates grow
    geometrically; the driver's backtracking halves both default steps once and the run
    then converges linearly): the safe step depends on the smoothness of every table row,
    not only on ``lambda_max(H_yy)``.
    Per iteration: one lower gradient, one lower cross HVP ``(H_xy v, H_yy v)`` (two
    lower gradients when the lower objective has no hvp) and one upper gradient, on one
    minibatch each. Memory: ``n_batches_lower (2 dy + dx) + n_batches_upper (dy + dx)``
    floats. ``res.state["work"]`` holds v, the means and the tables
    (:func:`saba_tables` unpacks it).
    """
    if ctx.sampler != "batches":
        raise ValueError(f"SABA needs fixed minibatches (sampler='batches'), got "
                         f"sampler={ctx.sampler!r}")
    mode = check_choice("memory_init", opts["memory_init"], tuple(_SABA_INIT))
    nb_l, nb_u = ctx.n_batches_lower, ctx.n_batches_upper
    size = _sf.saba_layout(ctx.dx, ctx.dy, nb_l, nb_u)[-1]
    return np.zeros(size), [], [_SABA_INIT[mode]]


def saba_tables(work, dx, dy, nb_lower, nb_upper):
    """Views of SABA's final ``work`` array: ``dict(v, filled, mean_lower, mean_upper,
    table_lower, table_upper)``; a lower row is ``(grad_y g_j, H_yy,j v, H_xy,j v)``, an upper
    row ``(grad_y f_i, grad_x f_i)``."""
    flag, ml, mu, tl, tu, size = _sf.saba_layout(dx, dy, nb_lower, nb_upper)
    if work.shape != (size,):
        raise ValueError(f"expected a SABA work array of size {size}, got shape={work.shape}")
    rl, ru = 2 * dy + dx, dy + dx
    return {"v": work[:dy], "filled": bool(work[flag]), "mean_lower": work[ml:ml + rl],
            "mean_upper": work[mu:mu + ru],
            "table_lower": work[tl:tl + nb_lower * rl].reshape(nb_lower, rl),
            "table_upper": work[tu:tu + nb_upper * ru].reshape(nb_upper, ru)}


def _setup_hessian_free(ctx, opts):
    """Hessian-free bilevel optimization, PZOBO (Sow, Ji & Liang, "On the convergence theory
    for Hessian-free bilevel algorithms", NeurIPS 2022).

    Iteration k: T lower SGD steps (step ``beta_k``) from the warm start ``y_k`` on T recorded
    minibatches give ``y_T(x)``; Q perturbed runs from the same ``y_k`` on the same minibatches
    give ``y_T(x + mu u_q)`` with Gaussian ``u_q ~ N(0, I_dx)``; with
    ``delta_q = (y_T(x + mu u_q) - y_T(x)) / mu``::

        h = grad_x f(x, y_T; zeta) + (1/Q) sum_q u_q <delta_q, grad_y f(x, y_T; zeta)>
        x <- P(x - alpha_k h),   y_{k+1} = y_T

    ``delta_q ~ J_T u_q`` with ``J_T = dy_T/dx`` and ``E[u u^T] = I``, so h estimates
    ``grad_x f + J_T^T grad_y f``, the implicit formula with the unrolled Jacobian.

    Parameters
    ----------
    directions : int, default 5
        Number Q of Gaussian directions per iteration.
    smoothing : float, default 1e-3
        Perturbation size mu (absolute, in the units of x).

    Notes
    -----
    Only gradient callbacks are used (no hvp, second-order callbacks may be absent).
    Sources of bias: (i) finite T: ``J_T`` is the Jacobian of T SGD steps from a warm start
    treated as independent of x; for a quadratic lower level
    ``J_T = (I - prod_t (I - beta H_t)) J`` so the error decays like ``(1 - beta mu_g)^T``
    (mu_g: strong convexity of g), and ``y_T`` itself is only close to ``y*(x)``; (ii) the
    smoothing: ``delta_q`` is a one-sided difference, exact when ``y_T`` is affine in x
    (quadratic g), otherwise biased by ``O(mu)`` (rounding errors grow like ``eps / mu``);
    (iii) Q directions: unbiased for ``J_T^T grad_y f`` given the batches, with variance of
    order ``dx |J_T^T grad_y f|^2 / Q``; (iv) minibatch correlation: the same T minibatches
    drive ``y_T`` (hence ``grad_y f(x, y_T)``) and the Jacobian estimate, so their noises
    correlate, a bias of order ``beta * (sample variance)`` (on mlocore's stochastic quadratic
    with constant steps the iterates stall at distance ~8 from x* for beta = 1/L_g, ~3 for
    beta = 0.15/L_g). The default schedules therefore decay (``alpha ~ k^-0.6``,
    ``beta ~ k^-0.4``, as SOBA's); a smaller beta enlarges bias (i) unless T grows.
    Per iteration: ``T (Q + 1)`` lower gradients on
    the lower batch size and one upper gradient.
    """
    q = check_int("directions", opts["directions"], 1)
    mu = check_positive("smoothing", opts["smoothing"])
    return np.zeros(0), [mu], [q]


def _vf_common(ctx, opts):
    a1 = check_positive("a1", opts["a1"], allow_zero=True)
    a2 = check_positive("a2", opts["a2"], allow_zero=True)
    return a1, a2


def _setup_penalty(ctx, opts):
    """Value-function penalty method (lecture eqs. 25-28; the smoothed value function of
    Sow, Ji, Guan & Liang, "A primal-dual approach to bilevel optimization with multiple inner
    minima", 2022).

    With ``v_a(x) = min_y g(x, y) + a1/2 |y|^2 + a2`` the problem is
    ``min_{x, y} f(x, y) + rho max(0, g(x, y) - v_a(x))``. Iteration k: ``yhat`` (the
    minimizer defining ``v_a``, warm-started, in ``work[:dy]``, starting at y0) takes T SGD
    steps on ``g(x, .) + a1/2 |.|^2`` with step ``beta_k``; then, on one lower batch xi and one
    upper batch zeta, ``c = g(x, y; xi) - g(x, yhat; xi) - a1/2 |yhat|^2 - a2`` and::

        x <- P(x - alpha_k (grad_x f + rho [c > 0] (grad_x g(x, y) - grad_x g(x, yhat)))
                / (1 + rho))
        y <- y - beta_k (grad_y f + rho [c > 0] grad_y g(x, y)) / (1 + rho)

    (Danskin's theorem: ``grad v_a(x) = grad_x g(x, yhat)``). Dividing by ``1 + rho``
    minimizes the same function scaled by a constant, whose smoothness is bounded
    independently of rho, so the default steps (0.5/L_F, 1/L_g) are stable for every rho.

    Parameters
    ----------
    rho : float, default 10
        Penalty weight. The penalized solution is biased: for a strongly convex g and
        ``a1 = a2 = 0`` its y sits at ``y*(x) - H_yy^{-1} grad_y f / rho`` and the x-bias is
        O(1/rho), while the penalized problem's conditioning (hence the iterations needed)
        grows like rho. rho must also be large enough for ``f + rho (g - v)`` to be bounded
        below in y (``grad^2_yy f + rho H_yy`` positive definite): on mlocore's stochastic
        quadratic rho = 1 diverges. The default 10 is this trade-off for a few thousand
        iterations (on ``make_quadratic(5, 10, 200, 200)``, full batch, the limit is at
        distance 6.4 from x* for rho = 10 and about 0.5 for rho = 100, but rho = 100 needs
        about ten times more iterations); raise rho together with maxiter for accuracy, or
        use "primal-dual", which adapts the weight.
    a1 : float, default 0
        Smoothing of the value function (>= 0). ``a1 > 0`` or ``a2 > 0`` make the constraint
        strictly feasible (useful for the primal-dual method) but enlarge the feasible set
        ``{y: g(x, y) <= v_a(x)}`` around ``y*(x)`` (radius of order ``sqrt(a1 / mu_g) |y*|``
        or ``sqrt(a2 / mu_g)``), a further bias.
    a2 : float, default 0
        Constant offset of the value function (>= 0).

    Notes
    -----
    Assumptions: f, g smooth; the value function differentiable (strongly convex g, or
    ``a1 > 0``); x projected, y unconstrained. ``max(0, c)`` is evaluated on a minibatch
    (a biased estimate of the constraint's activity). Per iteration: T + 2 lower gradients
    (T when the penalty is inactive), 2 lower values, 1 upper gradient.
    """
    a1, a2 = _vf_common(ctx, opts)
    rho = check_positive("rho", opts["rho"], allow_zero=True)
    return ctx.y0.copy(), [a1, a2, rho, 0.0, 0.0], []


def _setup_primal_dual(ctx, opts):
    """Primal-dual value-function method (Sow, Ji, Guan & Liang, "A primal-dual approach to
    bilevel optimization with multiple inner minima", 2022; lecture eq. 29):
    ``max_{rho >= 0} min_{x, y} f(x, y) + rho (g(x, y) - v_a(x) - eps)``.

    Iteration k: the penalty method's yhat update and primal step on the normalized
    Lagrangian ``(f + rho_k (g - v_a)) / (1 + rho_k)`` (no max), then projected dual ascent
    ``rho_{k+1} = max(0, rho_k + dual_step (c_k - eps))`` with the same minibatch estimate
    ``c_k`` of ``g(x_k, y_k) - v_a(x_k)``. ``work = [yhat (dy), rho]``: the final multiplier is
    ``res.state["work"][-1]`` (``MULTIPLIER_INDEX``).

    Parameters
    ----------
    dual_step : float, default 0.1
        Dual ascent step (in multiplier units per unit of constraint violation). With
        minibatch estimates the noise of ``c_k`` and of the SGD iterate y (whose noise ball
        keeps ``g(x, y) - v_a(x)`` above a small eps) drive rho up; a small step averages it.
    constraint_tol : float, default 1e-3
        eps > 0: the relaxed constraint ``g(x, y) - v_a(x) <= eps`` has an interior, so a
        finite multiplier exists (with ``eps = a1 = a2 = 0`` the constraint only holds with
        equality and rho grows without bound). The solution is biased by
        ``O(sqrt(eps / mu_g))`` in y.
    rho0 : float, default 1
        Initial multiplier (>= 0).
    a1, a2 : float, default 0
        As for the penalty method.

    Notes
    -----
    Assumptions as for the penalty method. Per iteration: T + 2 lower gradients, 2 lower
    values, 1 upper gradient.
    """
    a1, a2 = _vf_common(ctx, opts)
    ds = check_positive("dual_step", opts["dual_step"])
    eps = check_positive("constraint_tol", opts["constraint_tol"], allow_zero=True)
    rho0 = check_positive("rho0", opts["rho0"], allow_zero=True)
    work = np.empty(ctx.dy + 1)
    work[:ctx.dy] = ctx.y0
    work[ctx.dy] = rho0
    return work, [a1, a2, 0.0, ds, eps], []


FREE_METHODS = {
    "saba": MethodSpec(_sf.run_saba, alpha_power=0.0, beta_power=0.0, sampler="batches",
                       beta_safety=1.0 / 3.0,
                       uses=(), options={"memory_init": "full"}, setup=_setup_saba,
                       doc="Dagreou et al. 2022: SOBA with SAGA tables on fixed minibatches"),
    "hessian-free": MethodSpec(_sf.run_hessian_free, alpha_power=0.6, beta_power=0.4,
                               inner_steps=10, uses=("inner_steps",),
                               options={"directions": 5, "smoothing": 1e-3},
                               setup=_setup_hessian_free,
                               doc="Sow, Ji & Liang 2022a (PZOBO): Gaussian finite differences "
                                   "of the inner SGD trajectory, gradients only"),
    "penalty": MethodSpec(_sf.run_penalty, alpha_power=0.6, beta_power=0.4, inner_steps=1,
                          uses=("inner_steps",),
                          options={"rho": 10.0, "a1": 0.0, "a2": 0.0}, setup=_setup_penalty,
                          needs_value=True,
                          doc="value-function penalty f + rho max(0, g - v_a), lecture eq. 28"),
    "primal-dual": MethodSpec(_sf.run_primal_dual, alpha_power=0.6, beta_power=0.4,
                              inner_steps=1, uses=("inner_steps",),
                              options={"dual_step": 0.1, "constraint_tol": 1e-3, "rho0": 1.0,
                                       "a1": 0.0, "a2": 0.0},
                              setup=_setup_primal_dual, needs_value=True,
                              result=lambda work: {"multiplier": float(work[-1])},
                              doc="Sow et al. 2022b: primal-dual on the value-function "
                                  "constraint, lecture eq. 29"),
}
