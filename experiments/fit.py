"""Scaling-law fits (scipy), bootstrap intervals, and a self-test that recovers known coefficients.

Laws (L: cross-entropy in nats/token, N: parameters, D: training tokens, G: granularity, E: experts):
  granularity  L(G) = h + g * G^-gamma                                 (Krajewski et al. 2024, per size)
  joint        L(N, D, G) = c + (g / G^gamma + a) * N^-alpha + b * D^-beta   (Krajewski et al. 2024, Eq. 7)
  clark        log10 L = a log10 N + b log10 E + c log10 N log10 E + d   (Clark et al. 2022, Eq. 2)

The first two are fitted as Krajewski et al. fit theirs: Huber loss (delta 0.1 by default) on the
residual log L_fit - log L, minimised with L-BFGS-B from every point of a grid of starts, best kept.
The joint law is written with a = e^A, b = e^B, g = e^Gl, c = e^C, so
log L_fit = logsumexp(C, logsumexp(Gl - gamma log G, A) - alpha log N, B - beta log D) and its
gradient is analytic; its starts are the best points of a 3^7 grid (objective evaluated at all).
Clark's law is linear in its coefficients: least squares.
Bootstrap (Krajewski et al.): refit on 80 % of the points drawn without replacement, 100 times;
intervals are the 5th and 95th percentiles.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 0.1
KRAJEWSKI = dict(a=18.1, alpha=0.115, b=30.8, beta=0.147, g=2.1, gamma=0.58, c=0.47)  # their Table 1
CLARK_S_BASE = dict(b=-0.108, c=0.009)  # Clark et al. 2022, Table 3


@dataclasses.dataclass
class Fit:
    law: str
    params: dict
    objective: float
    n_points: int
    intervals: dict = dataclasses.field(default_factory=dict)  # name -> (5th, 95th percentile)
    # Coefficients whose estimate sits on a bound of the search box: the data do not pin them down (the
    # optimum lies outside the box or the objective is flat there), so their value is not a measurement.
    at_bound: list = dataclasses.field(default_factory=list)

    def predict(self, **x) -> np.ndarray:
        return PREDICT[self.law](self.params, **x)


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative."""
    a = np.abs(r)
    loss = np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))
    return loss, np.clip(r, -delta, delta)


# ---- granularity law ----
def predict_granularity(p: dict, *, G) -> np.ndarray:
    return p["h"] + p["g"] * np.asarray(G, float) ** -p["gamma"]


def fit_granularity(G, L, *, delta: float = HUBER_DELTA, starts=None) -> Fit:
    G, L = np.asarray(G, float), np.asarray(L, float)
    logL = np.log(L)

    def objective(theta):
        pred = theta[0] + theta[1] * G ** -theta[2]
        if np.any(pred <= 0):
            return 1e6 + float(np.sum(np.maximum(-pred, 0)))
        return float(np.sum(huber(np.log(pred) - logL, delta)[0]))

    lo = float(L.min())
    if starts is None:
        starts = itertools.product((0.5 * lo, 0.9 * lo), (-0.5, 0.1, 1.0), (0.2, 0.6, 1.5))
    bounds = [(1e-6, 10 * float(L.max())), (-100.0, 100.0), (0.0, 5.0)]
    best = _best(objective, None, starts, bounds)
    names = ("h", "g", "gamma")
    return Fit("granularity", dict(zip(names, best.x.tolist())), float(best.fun), len(L),
               at_bound=_at_bound(names, best.x, bounds))


# ---- joint law ----
_JOINT = ("A", "alpha", "B", "beta", "Gl", "gamma", "C")


def _joint_log_pred(thetas, lnN, lnD, lnG):
    """log L_fit for v parameter vectors `thetas` <[v, 7]> at once: (u <[v, 3, n]>, log L_fit <[v, n]>, tg, m)."""
    A, alpha, B, beta, Gl, gamma, C = (thetas[:, i:i + 1] for i in range(7))
    tg = Gl - gamma * lnG
    m = np.logaddexp(tg, A)  # log(g G^-gamma + a)
    u = np.stack([np.broadcast_to(C, tg.shape), m - alpha * lnN, B - beta * lnD], axis=1)
    top = u.max(axis=1)
    return u, top + np.log(np.exp(u - top[:, None]).sum(axis=1)), tg, m


def _joint_objective(theta, lnN, lnD, lnG, logL, delta):
    u, pred, tg, m = (v[0] for v in _joint_log_pred(np.asarray(theta, float)[None], lnN, lnD, lnG))
    loss, dr = huber(pred - logL, delta)
    w = np.exp(u - pred)  # d log L_fit / d u_i
    w1, dm = w[1] * dr, np.exp(tg - m)
    grad = np.array([
        np.sum(w1 * (1.0 - dm)),  # A: d m / d A = a / (g G^-gamma + a)
        np.sum(w1 * -lnN),  # alpha
        np.sum(w[2] * dr),  # B
        np.sum(w[2] * dr * -lnD),  # beta
        np.sum(w1 * dm),  # Gl
        np.sum(w1 * dm * -lnG),  # gamma
        np.sum(w[0] * dr),  # C
    ])
    return float(np.sum(loss)), grad


def joint_params(theta) -> dict:
    A, alpha, B, beta, Gl, gamma, C = theta
    return dict(a=float(np.exp(A)), alpha=float(alpha), b=float(np.exp(B)), beta=float(beta), g=float(np.exp(Gl)),
                gamma=float(gamma), c=float(np.exp(C)))


def _joint_theta(p: dict) -> list:
    return [np.log(p["a"]), p["alpha"], np.log(p["b"]), p["beta"], np.log(p["g"]), p["gamma"], np.log(p["c"])]


def predict_joint(p: dict, *, N, D, G) -> np.ndarray:
    N, D, G = (np.asarray(v, float) for v in (N, D, G))
    return p["c"] + (p["g"] / G ** p["gamma"] + p["a"]) * N ** -p["alpha"] + p["b"] * D ** -p["beta"]


# The grid of starts (3^7 = 2187 points): the objective is evaluated at all of them, L-BFGS-B runs from
# the JOINT_STARTS best.
JOINT_GRID = dict(A=(0.0, 2.5, 5.0), alpha=(0.05, 0.2, 0.5), B=(0.0, 2.5, 5.0), beta=(0.05, 0.2, 0.5),
                  Gl=(-2.0, 0.0, 2.0), gamma=(0.2, 0.6, 1.2), C=(-2.0, -0.5, 1.0))
JOINT_STARTS = 8
JOINT_BOUNDS = dict(A=(-10, 15), alpha=(0, 2), B=(-10, 15), beta=(0, 2), Gl=(-10, 15), gamma=(0, 3), C=(-10, 3))


def fit_joint(N, D, G, L, *, delta: float = HUBER_DELTA, starts=None) -> Fit:
    lnN, lnD, lnG, logL = (np.log(np.asarray(v, float)) for v in (N, D, G, L))
    if starts is None:
        grid = np.array(list(itertools.product(*(JOINT_GRID[k] for k in _JOINT))))
        losses = np.concatenate([huber(_joint_log_pred(chunk, lnN, lnD, lnG)[1] - logL, delta)[0].sum(axis=1)
                                 for chunk in np.array_split(grid, max(1, len(grid) // 256))])
        starts = grid[np.argsort(losses)[:JOINT_STARTS]]
    bounds = [JOINT_BOUNDS[k] for k in _JOINT]
    best = _best(lambda t: _joint_objective(t, lnN, lnD, lnG, logL, delta), True, starts, bounds)
    names = ("a", "alpha", "b", "beta", "g", "gamma", "c")  # A, ..., C in the order of _JOINT
    return Fit("joint", joint_params(best.x), float(best.fun), len(logL), at_bound=_at_bound(names, best.x, bounds))


# ---- Clark et al. ----
def _clark_design(N, E) -> np.ndarray:
    lN, lE = np.log10(np.asarray(N, float)), np.log10(np.asarray(E, float))
    return np.stack([lN, lE, lN * lE, np.ones_like(lN)], axis=1)


def predict_clark(p: dict, *, N, E) -> np.ndarray:
    return 10 ** (_clark_design(N, E) @ np.array([p["a"], p["b"], p["c"], p["d"]]))


def fit_clark(N, E, L, starts=None) -> Fit:
    del starts  # linear: no starts
    X, y = _clark_design(N, E), np.log10(np.asarray(L, float))
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return Fit("clark", dict(zip("abcd", coef.tolist())), float(np.sum((X @ coef - y) ** 2)), len(y))


PREDICT = {"granularity": predict_granularity, "joint": predict_joint, "clark": predict_clark}


def _at_bound(names, x, bounds, rtol: float = 1e-6) -> list:
    """The names whose value in x lies on (within rtol of the box's width) its lower or upper bound."""
    out = []
    for name, v, (lo, hi) in zip(names, x, bounds):
        tol = rtol * (hi - lo)
        if v <= lo + tol or v >= hi - tol:
            out.append(name)
    return out


@threadpool_limits.wrap(limits=1, user_api="blas")  # L-BFGS-B's small BLAS calls run ~30x slower multi-threaded
def _best(objective, jac, starts, bounds):
    best = None
    for x0 in starts:
        x0 = np.clip(np.asarray(x0, float), [b[0] for b in bounds], [b[1] for b in bounds])
        res = optimize.minimize(objective, x0, jac=jac, method="L-BFGS-B", bounds=bounds,
                                options=dict(ftol=1e-15, gtol=1e-10, maxiter=5000))
        if best is None or res.fun < best.fun:
            best = res
    return best


def bootstrap(fit_fn, data: dict, full: Fit, *, n: int = 100, frac: float = 0.8, seed: int = 0) -> Fit:
    """`full` with `intervals`: percentiles 5 and 95 of each parameter over `n` refits on `frac` of the points
    (drawn without replacement). Refits start from the full fit (and, for the non-linear laws, its grid's
    corner starts are not repeated: the full fit is the best of them)."""
    rng = np.random.default_rng(seed)
    m = len(next(iter(data.values())))
    size = max(1, int(round(frac * m)))
    theta0 = _joint_theta(full.params) if full.law == "joint" else list(full.params.values())
    samples = []
    for _ in range(n):
        idx = rng.choice(m, size=size, replace=False)
        refit = fit_fn(**{k: np.asarray(v)[idx] for k, v in data.items()}, starts=[theta0])
        samples.append([refit.params[k] for k in full.params])
    samples = np.asarray(samples)
    lo, hi = np.percentile(samples, 5, axis=0), np.percentile(samples, 95, axis=0)
    full.intervals = {k: (float(a), float(b)) for k, a, b in zip(full.params, lo, hi)}
    return full


def self_test(*, noise: float = 0.003, seed: int = 0) -> dict:
    """Fits points generated from known coefficients (log-normal noise of sd `noise`) and reports
    {law: {"true", "fit", "ok"}} and "ok" overall. Tolerances: exponents within 0.03 (alpha, beta),
    0.1 (gamma); Clark's coefficients within 0.005; predictions within 3 noise sd (rms, log)."""
    rng = np.random.default_rng(seed)
    out = {}
    N, D, G = (a.ravel() for a in np.meshgrid([3e7, 1e8, 3e8, 1e9], [1e9, 3e9, 1e10, 3e10], [1, 2, 4, 8, 16]))
    L = predict_joint(KRAJEWSKI, N=N, D=D, G=G) * np.exp(noise * rng.standard_normal(N.shape))
    f = fit_joint(N, D, G, L)
    rms = float(np.sqrt(np.mean((np.log(f.predict(N=N, D=D, G=G)) - np.log(L)) ** 2)))
    ok = (abs(f.params["alpha"] - KRAJEWSKI["alpha"]) < 0.03 and abs(f.params["beta"] - KRAJEWSKI["beta"]) < 0.03
          and abs(f.params["gamma"] - KRAJEWSKI["gamma"]) < 0.1 and rms <= 3 * noise + 1e-9)
    out["joint"] = {"true": KRAJEWSKI, "fit": f.params, "rms_log": rms, "ok": bool(ok)}

    true_g = dict(h=2.0, g=0.5, gamma=0.58)
    Gs = np.array([1, 2, 4, 8, 16, 32], float)
    Lg = predict_granularity(true_g, G=Gs) * np.exp(noise / 3 * rng.standard_normal(Gs.shape))
    fg = fit_granularity(Gs, Lg)
    out["granularity"] = {"true": true_g, "fit": fg.params,
                          "ok": bool(abs(fg.params["gamma"] - true_g["gamma"]) < 0.1)}

    true_c = dict(a=-0.082, b=-0.108, c=0.009, d=1.104)
    Nc, Ec = (a.ravel() for a in np.meshgrid([1.5e7, 1e8, 4e8, 1.3e9], [1, 2, 8, 32, 128, 512]))
    Lc = predict_clark(true_c, N=Nc, E=Ec) * np.exp(noise / 3 * rng.standard_normal(Nc.shape))
    fc = fit_clark(Nc, Ec, Lc)
    out["clark"] = {"true": true_c, "fit": fc.params,
                    "ok": bool(all(abs(fc.params[k] - true_c[k]) < 0.005 for k in "bc"))}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out
