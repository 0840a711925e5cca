"""``sampler.name: nsga2`` (the default): Optuna's NSGA-II sampler, made picklable.

Ray Tune pickles the searcher (and so its sampler) when a Tuner is made and at each
experiment snapshot, and Optuna 5.1's genetic samplers (NSGA-II, NSGA-III) hold a
``threading.Lock`` that cannot be pickled; :class:`NSGAIISampler` leaves its locks out of
its pickle and makes fresh ones when it is loaded.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna

__all__ = ["NSGAIISampler"]

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
_LOCKS_KEY = "__sketchtune_locks__"


class _DropsLocks:
    """Pickles its ``__dict__`` with every lock left out; fresh locks on load."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        locks = {k: isinstance(v, type(threading.RLock())) for k, v in state.items()
                 if isinstance(v, _LOCK_TYPES)}
        for k in locks:
            del state[k]
        state[_LOCKS_KEY] = locks
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        locks = state.pop(_LOCKS_KEY, {})
        self.__dict__.update(state)
        for k, reentrant in locks.items():
            setattr(self, k, threading.RLock() if reentrant else threading.Lock())



class NSGAIISampler(_DropsLocks, optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, unchanged except that it pickles (see the module doc)."""
