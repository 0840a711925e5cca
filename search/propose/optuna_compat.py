"""The one place that reaches past Optuna's public API.

Optuna's public ``study.tell`` accepts a trial number, but setting a user attribute
needs an :class:`optuna.Trial` handle, and the public way to get one is
``study.ask()``. A trial asked by an earlier driver process (a search resumed after
its driver was killed), or one that must be closed from outside, has no handle here:
:func:`trial_handle` rebuilds it from the frozen trial's storage id, which Optuna
keeps in the private ``FrozenTrial._trial_id``. tests/test_optuna_compat.py checks
this against the installed Optuna.

It also holds a picklable :class:`NSGAIISampler`: Ray Tune pickles the searcher (and so its sampler)
when a Tuner is made and at each experiment snapshot, and Optuna 5.1's genetic
samplers (NSGA-II, NSGA-III) hold a ``threading.Lock`` that cannot be pickled.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna
from optuna.trial import TrialState

__all__ = ["trial_handle", "close_running", "NSGAIISampler"]

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
_LOCKS_KEY = "__sketchtune_locks__"


def trial_handle(study: optuna.Study, number: int) -> optuna.Trial:
    """A writable handle on trial ``number`` of ``study`` (which must still be RUNNING)."""
    for frozen in study.get_trials(deepcopy=False):
        if frozen.number == number:
            return optuna.Trial(study, frozen._trial_id)
    raise KeyError(f"study {study.study_name!r} has no trial {number}")


def close_running(study: optuna.Study, number: int, status: str) -> None:
    """Close RUNNING trial ``number`` as FAIL, with user attr ``status``."""
    trial_handle(study, number).set_user_attr("status", status)
    study.tell(number, state=TrialState.FAIL)


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
