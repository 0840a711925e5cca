"""Which images a search chooses on and which it reports on (``trial.val_source``).

Everything a search chooses (the trials' scores, so the Pareto front and the pick, and
the retrain's best epoch) is measured on one set of images, and the final test accuracy
on another that none of those choices saw:

- ``train_holdout``: the validation split held out of the training split
  (``trial.val_fraction``, seeded by ``trial.seed``) chooses; the whole test split
  reports. Right when the baseline never trained on those validation images: a
  baseline pretrained by the search, or a checkpoint whose recorded training split
  (``meta["split"]``) is this search's.
- ``test_holdout``: ``trial.test_holdout`` images of the test split (seeded by
  ``trial.seed``) choose; the other test images report. The training split is used
  whole (nothing of it is held out). Right when the baseline may have trained on any
  training image (public weights, a checkpoint without a record or with another split).

``auto`` (the default) picks by the baseline's provenance (:func:`choose_val_source`).
The resolved choice is a plain record (:func:`scores_record`) kept in the experiment's
manifest, so that resumed trials and the retrain serve the very same images
(:func:`scored_data`). No Ray, no Optuna here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.experiment.config import ModelConfig, SearchConfig, TrialConfig
from sketch_core.data.request import DataRequest
from sketch_core.data.sets import hold_out_test, loader_rows
from sketch_core.errors import UserError
from sketch_core.io.checkpoint import read_record

__all__ = ["VAL_SOURCES", "DEFAULT_TEST_HOLDOUT", "choose_val_source", "holdout_size",
           "scored_data", "scores_record", "data_val_fraction", "describe", "split_record",
           "data_request"]

VAL_SOURCES = ("train_holdout", "test_holdout")
DEFAULT_TEST_HOLDOUT = 2000  # images; capped at half the test split


def split_record(config: SearchConfig) -> dict[str, Any]:
    """The training split of the search (what a checkpoint records as ``split``)."""
    m, t = config.model, config.trial
    path = str(Path(m.data_path).expanduser().resolve()) if m.data_path else None
    return {"data_set": m.data_set, "data_path": path, "seed": t.seed,
            "val_fraction": t.val_fraction}


def choose_val_source(config: SearchConfig) -> tuple[str, str]:
    """(``train_holdout`` or ``test_holdout``, why): ``trial.val_source`` when set, else
    by the baseline's provenance (reads ``model.pretrained``'s record, not its weights);
    an explicit choice that the provenance contradicts says so in its reason."""
    t = config.trial
    auto, why = _by_provenance(config)
    if t.val_source == "auto":
        return auto, why
    if t.val_source != auto:
        return t.val_source, f"trial.val_source says so (auto would choose {auto}: {why})"
    return t.val_source, "trial.val_source says so"


def _by_provenance(config: SearchConfig) -> tuple[str, str]:
    m = config.model
    if not m.pretrained:
        return "train_holdout", ("the baseline is pretrained here on this search's training "
                                 "split, so it never saw the validation images")
    path = Path(m.pretrained).expanduser()
    if not path.is_file():
        raise UserError(f"model.pretrained {m.pretrained}: no such file")
    split = read_record(path).get("split")
    if split and "weights_from" in split:
        seen = ("records another training split" if split.get("weights_split")
                else "records no training split")
        return "test_holdout", (f"model.pretrained was trained from {split['weights_from']}, "
                                f"which {seen}, so its weights may have seen this search's "
                                f"validation images")
    if split and split == split_record(config):
        return "train_holdout", ("model.pretrained records training on this search's "
                                 "training split (validation images held out)")
    if split:
        return "test_holdout", (f"model.pretrained records another training split "
                                f"({', '.join(f'{k} {v}' for k, v in split.items())}), so it "
                                f"may have trained on this search's validation images")
    return "test_holdout", ("model.pretrained records no training split, so it may have "
                            "trained on any training image")


def data_val_fraction(trial: TrialConfig, val_source: str) -> float:
    """The fraction of the training split to hold out when loading: none for test_holdout."""
    return 0.0 if val_source == "test_holdout" else trial.val_fraction


def holdout_size(trial: TrialConfig, n_test: int, data_set: str) -> int:
    """How many test images choose: ``trial.test_holdout``, else
    min(:data:`DEFAULT_TEST_HOLDOUT`, half the test split); a :class:`UserError` when the
    test split cannot give that many and keep some to report on."""
    if n_test < 2:
        raise UserError(f"trial.val_source test_holdout needs a test split to hold images out "
                        f"of; data set {data_set} has {n_test} test image(s) (at least 2 are "
                        f"needed: some choose, the rest report)")
    if trial.test_holdout is None:
        return min(DEFAULT_TEST_HOLDOUT, n_test // 2)
    if trial.test_holdout >= n_test:
        raise UserError(f"trial.test_holdout: {trial.test_holdout} is not smaller than the test "
                        f"split ({n_test} images); some test images must be left to report on")
    return trial.test_holdout


def scored_data(data: Any, trial: TrialConfig, scores: dict | None, data_set: str) -> Any:
    """``data`` (loaded with :func:`data_val_fraction`) as the search scores it: itself for
    train_holdout (or no record: searches older than the choice), else with the held-out
    test images as ``val`` and the others as ``test``. ``scores`` is a
    :func:`scores_record` or ``{"val_source": ...}`` (the size then follows the config)."""
    if not scores or scores.get("val_source") != "test_holdout":
        return data
    n_test = len(loader_rows(data.test))
    if scores.get("choose_images") is not None:
        n = int(scores["choose_images"])
        total = n + int(scores["report_images"])
        if total != n_test:
            raise UserError(f"the test split of {data_set} has {n_test} images, but the search "
                            f"chose on {n} of {total}; use the data the search used")
    else:
        n = holdout_size(trial, n_test, data_set)
    seed = scores.get("seed")  # the record's seed: the images the search itself held out
    return hold_out_test(data, n, trial.seed if seed is None else int(seed))


def data_request(model: ModelConfig, trial: TrialConfig, scores: dict | None, *,
                 normalize: Any = None, batch_size: int | None = None) -> DataRequest:
    """The data as the search scores it, described once for every process that loads it:
    ``val`` chooses, ``test`` reports. ``scores`` is the manifest's :func:`scores_record`
    (older searches: train_holdout); ``normalize`` as ``load_data`` takes it."""
    scores = scores or {}
    source = scores.get("val_source", "train_holdout")
    holdout = total = None
    if source == "test_holdout" and scores.get("choose_images") is not None:
        holdout = int(scores["choose_images"])
        total = holdout + int(scores["report_images"])
    seed = scores.get("seed")  # the record's seed: the images the search itself held out
    return DataRequest(model.data_set, model.data_path, batch_size=batch_size or trial.batch_size,
                       eval_batch_size=trial.eval_batch_size,
                       val_fraction=data_val_fraction(trial, source), seed=trial.seed,
                       input_size=model.input_size, synthetic=model.synthetic,
                       normalize=normalize, download=model.download, test_holdout=holdout,
                       holdout_seed=trial.seed if seed is None else int(seed), test_images=total)


def scores_record(val_source: str, reason: str, data: Any, trial: TrialConfig) -> dict:
    """What the manifest keeps: the choice, why, and how many images choose and report."""
    record = {"val_source": val_source, "reason": reason, "seed": trial.seed,
              "choose_images": 0 if data.val is None else len(loader_rows(data.val)),
              "report_images": len(loader_rows(data.test))}
    if val_source == "train_holdout":
        record["val_fraction"] = trial.val_fraction
    return record


def describe(scores: dict | None) -> str:
    """One line: which images choose and which report."""
    if not scores or scores.get("val_source") != "test_holdout":
        n = "" if (scores or {}).get("choose_images") is None else f"{scores['choose_images']} "
        return (f"val_source train_holdout: {n}validation images held out of the training "
                f"split choose, the test split reports")
    return (f"val_source test_holdout: {scores['choose_images']} test images choose, the other "
            f"{scores['report_images']} report")
