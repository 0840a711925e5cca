"""The one place that reaches past Optuna's public API.

Optuna's public ``study.tell`` accepts a trial number, but setting a user attribute
needs an :class:`optuna.Trial` handle, and the public way to get one is
``study.ask()``. A trial asked by an earlier driver process (a search resumed after
its driver was killed), or one that must be closed from outside, has no handle here:
:func:`trial_handle` rebuilds it from the frozen trial's storage id, which Optuna
keeps in the private ``FrozenTrial._trial_id``. tests/test_optuna_compat.py checks
this against the installed Optuna.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

__all__ = ["trial_handle", "close_running"]



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
