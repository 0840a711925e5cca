"""``sampler.name: surrogate``: a model-based sampler that learns from every trial.

:class:`SurrogateSampler` is an Optuna sampler (the public ``BaseSampler`` API:
``infer_relative_search_space`` / ``sample_relative`` / ``sample_independent``) for a
:class:`~search.propose.space.RateSpace`. Each proposal:

1. **Observations.** Every COMPLETE trial gives its final validation accuracy. Every
   trial stopped early (PRUNED with ``status: stopped``) gives its accuracy at the
   epoch it reached, mapped to an estimate of its final accuracy by a line fitted on the
   completed trials' own curves (their accuracy at that epoch against their final
   accuracy; the per-epoch scores are the ``rung_acc_EEE`` user attrs that
   :meth:`search.propose.proposer.RateProposer.note` writes). A stopped trial counts with
   weight :data:`STOPPED_WEIGHT` and stays PRUNED, with no values, in the study: its
   estimate lives only inside this model, never in a result, a table or the front.
   Rejected and repaired proposals are not observations.
2. **Model.** Bayesian ridge regression of accuracy on the log of each rate, its
   square, and the log of the vector's FLOPs ratio; the ridge strength is chosen by
   weighted leave-one-out error; the predictive spread is the posterior's.
3. **Proposal.** Candidates are every uniform vector of the grid (the family a user
   would sweep by hand), random vectors of the grid, near-uniform vectors (each rate
   within two grid steps of a common level) and mutations of the observed front (a few
   rates moved one or two grid steps). Each is priced (FLOPs are
   known before training) and scored by the hypervolume it would add to the observed
   front at an optimistic accuracy (mean + :data:`KAPPA` x spread). A candidate above a
   budget (FLOPs or latency) is first scaled down onto it (all its rates times one
   factor, snapped down to the grid), and one that still is above is never proposed;
   so under a tight budget the proposals are feasible and spread, not rejected in
   long runs. Vectors already asked for (in any state, running ones included) are
   skipped.

Until :data:`STARTUP` observations (by weight) exist, vectors are drawn at random
(after the anchors and paper vectors, which come first), scaled onto the budget when
there is one; so is a proposal when no candidate of the model is new and in budget. No
state beyond the study: ``--resume`` and a new driver see the same sampler. Nothing is
fetched; numpy only.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from search.propose.space import RateSpace
from search.results.pareto import front_indices, hypervolume

__all__ = ["SurrogateSampler", "Observation", "observations", "rung_key", "RUNG_PREFIX",
           "STOPPED_WEIGHT", "STARTUP", "KAPPA"]

RUNG_PREFIX = "rung_acc_"
STOPPED_WEIGHT = 0.5    # a stopped trial's estimated final accuracy counts half
STARTUP = 8             # observations before the model proposes
KAPPA = 1.0             # optimism: mean + KAPPA * predictive sd
CANDIDATES = 512
SHRINK_STEPS = 10       # bisection steps that scale an over-budget candidate onto the budget
RIDGES = (0.01, 0.1, 1.0, 10.0, 100.0)


def rung_key(epoch: int) -> str:
    """The user attr holding a trial's validation accuracy after ``epoch`` epochs."""
    return f"{RUNG_PREFIX}{int(epoch):03d}"


def _curve(trial: FrozenTrial) -> dict[int, float]:
    return {int(k[len(RUNG_PREFIX):]): float(v) for k, v in trial.user_attrs.items()
            if k.startswith(RUNG_PREFIX) and v is not None}


class Observation:
    """One trial as the model sees it: rates, (estimated) final accuracy, weight."""

    __slots__ = ("rates", "acc", "weight", "stopped", "number")

    def __init__(self, rates: list[float], acc: float, weight: float, stopped: bool,
                 number: int) -> None:
        self.rates, self.acc, self.weight, self.stopped = rates, acc, weight, stopped
        self.number = number

    def __repr__(self) -> str:
        return (f"Observation(#{self.number}, acc={self.acc:.4f}, weight={self.weight}, "
                f"stopped={self.stopped})")


def _epoch_map(completed: list[tuple[dict[int, float], float]], epoch: int
               ) -> tuple[float, float]:
    """``(a, b)`` of final ~ a + b * acc_at_epoch from the completed trials' curves."""
    pairs = [(c[epoch], final) for c, final in completed if epoch in c]
    if not pairs:
        return 0.0, 1.0  # nothing known: the stopped score as it is
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    if len(pairs) >= 3 and float(np.var(x)) > 1e-6:
        b = float(np.clip(np.cov(x, y, bias=True)[0, 1] / np.var(x), 0.0, 2.0))
    else:
        b = 1.0
    return float(np.mean(y) - b * np.mean(x)), b


def observations(study: optuna.Study, space: RateSpace) -> list[Observation]:
    """The completed and the stopped trials of ``study``, as the model uses them."""
    done: list[tuple[FrozenTrial, list[float]]] = []
    stopped: list[tuple[FrozenTrial, list[float]]] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if any(n not in t.params for n in space.param_names):
            continue
        rates = space.rates_from_params(t.params)
        status = t.user_attrs.get("status")
        if t.state == TrialState.COMPLETE and status not in ("rejected",) and t.values:
            done.append((t, rates))
        elif (t.state == TrialState.PRUNED and status == "stopped"
              and t.user_attrs.get("val_acc") is not None):
            stopped.append((t, rates))
    out = [Observation(r, float(t.values[0]), 1.0, False, t.number) for t, r in done]
    curves = [(_curve(t), float(t.values[0])) for t, _ in done]
    for t, rates in stopped:
        epoch = int(t.user_attrs.get("epochs", 0))
        a, b = _epoch_map(curves, epoch)
        guess = a + b * float(t.user_attrs["val_acc"])
        out.append(Observation(rates, float(min(1.0, max(0.0, guess))), STOPPED_WEIGHT, True,
                               t.number))
    return out


class _Model:
    """Weighted Bayesian ridge regression on fixed features of a rate vector."""

    def __init__(self, features: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        self.mu_x = np.average(features, axis=0, weights=w)
        self.sd_x = np.sqrt(np.average((features - self.mu_x) ** 2, axis=0, weights=w)) + 1e-9
        self.mu_y = float(np.average(y, weights=w))
        x = (features - self.mu_x) / self.sd_x
        yc = y - self.mu_y
        self.ridge = min(RIDGES, key=lambda lam: self._loo(x, yc, w, lam))
        a = x.T @ (x * w[:, None]) + self.ridge * np.eye(x.shape[1])
        self.a_inv = np.linalg.inv(a)
        self.coef = self.a_inv @ (x.T @ (w * yc))
        resid = yc - x @ self.coef
        dof = max(1.0, float(w.sum()) - 1.0)
        self.noise = float(max(1e-6, (w * resid ** 2).sum() / dof))

    @staticmethod
    def _loo(x: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float) -> float:
        a = x.T @ (x * w[:, None]) + lam * np.eye(x.shape[1])
        a_inv = np.linalg.inv(a)
        coef = a_inv @ (x.T @ (w * y))
        lev = np.einsum("ij,jk,ik->i", x, a_inv, x) * w
        resid = (y - x @ coef) / np.clip(1.0 - lev, 1e-6, None)
        return float((w * resid ** 2).sum())

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = (features - self.mu_x) / self.sd_x
        mean = self.mu_y + x @ self.coef
        var = self.noise * (1.0 + np.einsum("ij,jk,ik->i", x, self.a_inv, x))
        return mean, np.sqrt(var)


class SurrogateSampler(optuna.samplers.BaseSampler):
    """Proposes the rate vector with the largest optimistic hypervolume gain (module doc)."""

    def __init__(self, space: RateSpace, *, seed: int | None = None,
                 flops_budget: float | None = None, startup: int = STARTUP,
                 kappa: float = KAPPA, candidates: int = CANDIDATES,
                 budgets: dict[str, float] | None = None, cost: str = "flops_ratio") -> None:
        self.space = space
        self.budgets = dict(budgets or {})  # {cost key: fraction}, as the proposer's
        if flops_budget is not None:
            self.budgets.setdefault("flops_ratio", float(flops_budget))
        self.flops_budget = self.budgets.get("flops_ratio")
        self.cost = cost  # the front's cost axis: flops_ratio or latency_ratio
        self.startup = startup
        self.kappa = kappa
        self.candidates = candidates
        self._rng = np.random.RandomState(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self.last_fit: dict[str, Any] = {}  # what the last proposal was built on (for tests)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["last_fit"] = {}  # rebuilt at the next proposal
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        fb = state.get("flops_budget")  # pickled before budgets and cost existed
        state.setdefault("budgets", {} if fb is None else {"flops_ratio": fb})
        state.setdefault("cost", "flops_ratio")
        self.__dict__.update(state)

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._random.reseed_rng()

    # ---------------------------------------------------------------- Optuna's API

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        s = self.space
        return {n: FloatDistribution(s.low, s.high, step=s.step) for n in s.param_names}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        obs = observations(study, self.space)
        seen = self._seen(study, trial)
        if sum(o.weight for o in obs) < self.startup:
            self.last_fit = {"observations": obs, "model": None}
            values = self._random_feasible(seen)
        else:
            values = self._propose(obs, seen)
        return {} if values is None else dict(zip(self.space.param_names, values))

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def predict(self, values: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sd of the accuracy the last fitted model predicts for vectors given as
        one value per parameter (per group)."""
        model = self.last_fit.get("model")
        if model is None:
            raise RuntimeError("the surrogate has not been fitted yet")
        v = np.asarray(values, dtype=float)
        return model.predict(self._features(v, self._price(v)))

    # ---------------------------------------------------------------- the model

    def _grid(self) -> np.ndarray:
        s = self.space
        if s.grid is not None:
            return np.array(s.grid)
        return np.linspace(s.low, s.high, 21)

    def _features(self, values: np.ndarray, flops_ratio: np.ndarray) -> np.ndarray:
        logs = np.log(np.clip(values, 1e-3, None))
        return np.hstack([logs, logs ** 2, np.log(np.clip(flops_ratio, 1e-6, None))[:, None]])

    def _values(self, rates: list[float]) -> list[float]:
        return [rates[g[0]] for g in self.space.groups]

    def _price(self, values: np.ndarray) -> np.ndarray:
        return self.space.flops_ratios([self.space.expand(v) for v in values])

    def _cost(self, values: np.ndarray, flops_ratio: np.ndarray) -> np.ndarray:
        """The front's cost axis of vectors given per group (``flops_ratio`` given)."""
        if self.cost == "flops_ratio":
            return flops_ratio
        return self.space.ratios([self.space.expand(v) for v in values], self.cost)

    def _feasible(self, values: np.ndarray) -> np.ndarray:
        return self.space.feasible_many([self.space.expand(v) for v in values], self.budgets)

    def _shrink(self, cand: np.ndarray, steps: int = SHRINK_STEPS) -> np.ndarray:
        """Candidates above a budget scaled down onto it: each vector times one factor,
        snapped down to the grid, the largest factor found by bisection (what
        :meth:`RateSpace.repair` does for one vector, here for all at once). A
        candidate that cannot be brought within the budget is left as it is."""
        if not self.budgets or not len(cand):
            return cand
        ok = self._feasible(cand)
        if ok.all():
            return cand
        grid = self._grid()
        rows = np.flatnonzero(~ok)
        bad = cand[rows]

        def snapped(scale: np.ndarray) -> np.ndarray:
            idx = np.searchsorted(grid, bad * scale[:, None] + 1e-9, side="right") - 1
            return grid[np.clip(idx, 0, len(grid) - 1)]

        lo, hi = np.zeros(len(bad)), np.ones(len(bad))
        for _ in range(steps):
            mid = (lo + hi) / 2
            fits = self._feasible(snapped(mid))
            lo, hi = np.where(fits, mid, lo), np.where(fits, hi, mid)
        fixed = snapped(lo)
        fits = self._feasible(fixed)
        out = cand.copy()
        out[rows[fits]] = fixed[fits]
        return out

    def _candidates(self, obs: list[Observation], front_values: list[list[float]]
                    ) -> np.ndarray:
        """Every uniform vector of the grid; then, in equal parts, random grid vectors,
        near-uniform ones (each rate within two grid steps of one common level) and the
        front's vectors with 1-3 rates moved 1-2 steps."""
        grid = self._grid()
        k = len(self.space.param_names)
        uniform = np.repeat(grid[:, None], k, axis=1)
        n_rand = n_near = self.candidates // 4
        n_mut = self.candidates - n_rand - n_near
        rand = grid[self._rng.randint(len(grid), size=(n_rand, k))]
        level = self._rng.randint(len(grid), size=(n_near, 1))
        near = grid[np.clip(level + self._rng.randint(-2, 3, size=(n_near, k)), 0, len(grid) - 1)]
        parents = np.array(front_values or [self._values(o.rates) for o in obs])
        pos = np.abs(parents[:, :, None] - grid[None, None, :]).argmin(axis=2)
        pos = pos[self._rng.randint(len(parents), size=n_mut)]
        moved = self._rng.rand(n_mut, k) < self._rng.randint(1, 4, size=(n_mut, 1)) / k
        moved[np.arange(n_mut), self._rng.randint(k, size=n_mut)] = True
        step = self._rng.choice([-2, -1, 1, 2], size=(n_mut, k))
        muts = grid[np.clip(pos + moved * step, 0, len(grid) - 1)]
        return np.vstack([uniform, rand, near, muts])

    def _seen(self, study: optuna.Study, current: FrozenTrial) -> set[tuple]:
        """Vectors already asked for, in any state (running ones included)."""
        names = self.space.param_names
        return {tuple(round(float(t.params[n]), 9) for n in names)
                for t in study.get_trials(deepcopy=False)
                if t.number != current.number and all(n in t.params for n in names)}

    def _random_feasible(self, seen: set[tuple]) -> list[float] | None:
        """A random grid vector within the budgets (before the model has data); when no
        candidate is, the one least above them."""
        if not self.budgets:
            return None  # Optuna's random sampler draws it
        grid = self._grid()
        cand = grid[self._rng.randint(len(grid), size=(self.candidates,
                                                        len(self.space.param_names)))]
        cand = self._shrink(cand)
        feasible = self._feasible(cand)
        ok = [i for i in range(len(cand)) if feasible[i]
              and tuple(np.round(cand[i], 9)) not in seen]
        best = ok[self._rng.randint(len(ok))] if ok else int(np.argmin(self._overrun(cand)))
        return [float(v) for v in cand[best]]

    def _overrun(self, values: np.ndarray) -> np.ndarray:
        """How far each vector is above its budgets: the largest cost / budget over them
        (<= 1: within every one)."""
        rates = [self.space.expand(v) for v in values]
        return np.max([self.space.ratios(rates, k) / max(lim, 1e-12)
                       for k, lim in self.budgets.items()], axis=0)

    def _propose(self, obs: list[Observation], seen: set[tuple]) -> list[float] | None:
        vals = np.array([self._values(o.rates) for o in obs])
        fr = self._price(vals)
        y = np.array([o.acc for o in obs])
        w = np.array([o.weight for o in obs])
        model = _Model(self._features(vals, fr), y, w)
        cost = self._cost(vals, fr)
        on_front = front_indices(y, cost)
        front_acc, front_cost = y[on_front], cost[on_front]
        front_values = [vals[i].tolist() for i in on_front]
        cand = self._shrink(self._candidates(obs, front_values))
        cand_fr = self._price(cand)
        seen = seen | {tuple(np.round(v, 9)) for v in vals}
        keep = np.array([tuple(np.round(c, 9)) not in seen for c in cand])
        if self.budgets:
            keep &= self._feasible(cand)
        if not keep.any():
            return self._random_feasible(seen)
        cand, cand_fr = cand[keep], cand_fr[keep]
        cand_cost = self._cost(cand, cand_fr)
        mean, sd = model.predict(self._features(cand, cand_fr))
        optimistic = np.clip(mean + self.kappa * sd, 0.0, 1.0)
        base = hypervolume(front_acc, front_cost)
        gains = np.array([hypervolume(np.append(front_acc, a), np.append(front_cost, f)) - base
                          for f, a in zip(cand_cost, optimistic)])
        if gains.max() <= 0.0:  # nothing beats the front even optimistically: most uncertain
            best = int(np.argmax(sd))
        else:
            best = int(np.argmax(gains))
        self.last_fit = {"observations": obs, "model": model, "gain": float(gains[best]),
                         "predicted": float(mean[best]), "sd": float(sd[best])}
        return [float(v) for v in cand[best]]
