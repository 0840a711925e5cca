"""The unpruned baseline a search sketches: loaded from ``model.pretrained`` or pretrained.

With ``model.pretrained`` the checkpoint must match the config (architecture, classes,
input channels, unpruned widths). Without one, small data sets (digits, synthetic) get
a baseline trained with ``model.pretrain`` and cached under a hash of that recipe, so
the next search with the same recipe starts at once. Either way the experiment folder
receives ``baseline.pt`` (sketchtune format) and the manifest its FLOPs, parameters
and validation/test accuracy, measured on the images that choose and those that report
(``trial.val_source``, :mod:`search.experiment.scoring_split`; the record goes into the manifest as
``scores``). Runs in the driver; no Ray.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from search.experiment.config import ModelConfig, SearchConfig, TrialConfig, recipe_hash
from search.experiment.scoring_split import (choose_val_source, data_request, describe, scored_data,
                           scores_record, split_record)
from sketch_core.cost.flops import count_flops
from sketch_core.data.folder_cache import prepare_folder_cache
from sketch_core.data.normalize import as_record, choose_normalize
from sketch_core.data.subsets import check_images
from sketch_core.errors import UserError
from sketch_core.io.checkpoint import load_checkpoint, read_record, save_checkpoint
from sketch_core.pipeline import Outputs, prune_and_finetune
from sketch_core.training.loop import evaluate

__all__ = ["Baseline", "prepare_baseline", "cache_dir", "load_search_data", "load_baseline_file",
           "check_pretrained", "set_cpu_threads", "search_normalize", "prepare_folder",
           "baseline_dict"]

log = logging.getLogger("sketchtune.search")
PRETRAINABLE = ("digits", "synthetic")


@dataclass
class Baseline:
    state: dict[str, torch.Tensor]
    num_classes: int
    in_channels: int
    input_size: int
    flops: int
    params: int
    val_acc: float | None
    test_acc: float | None
    source: str
    pretrain_s: float = 0.0
    transform_input: bool = False
    family: str | None = None                    # the model family the search sketches
    normalize: dict[str, list[float]] | None = None  # the (mean, std) its inputs use, as recorded
    scores: dict | None = None  # which images choose and report (search.experiment.scoring_split.scores_record)

    def summary(self) -> dict[str, Any]:
        return {"flops": self.flops, "params": self.params, "val_acc": self.val_acc,
                "test_acc": self.test_acc, "source": self.source,
                "num_classes": self.num_classes, "in_channels": self.in_channels,
                "input_size": self.input_size, "family": self.family,
                "normalize": self.normalize, "scores": self.scores}


def cache_dir(config: SearchConfig) -> Path:
    if config.model.pretrain.cache_dir:
        return Path(config.model.pretrain.cache_dir).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "sketchtune" / "baselines"


def load_search_data(model: ModelConfig, trial: TrialConfig, scores: dict | None, *,
                     batch_size: int | None = None, device: str = "cpu",
                     normalize: Any = None) -> Any:
    """The data set as the search scores it: ``val`` chooses, ``test`` reports.
    ``scores``: the search's :func:`~search.experiment.scoring_split.scores_record`, or
    ``{"val_source": ...}`` before the split is counted (the size then follows ``trial``);
    None: the validation split held out of the training split."""
    request = data_request(model, trial, scores, normalize=normalize, batch_size=batch_size)
    data = request.load(device)
    if request.test_holdout is None:  # not counted yet
        data = scored_data(data, trial, scores, model.data_set)
    return data


def prepare_folder(model: ModelConfig) -> None:
    """Decode a small-image folder set into its cache before any trial starts, so that
    concurrent trials only read the cache (none of them decodes, none races to write)."""
    if model.data_set == "folder" and model.data_path:
        prepare_folder_cache(Path(model.data_path).expanduser())


def search_normalize(config: SearchConfig) -> Any:
    """The ``(mean, std)`` the search normalises with: ``model.normalize`` when set (an
    error when it contradicts ``model.pretrained``'s record, unless
    ``model.force_normalize``), else the record, else None (the data set's own)."""
    m = config.model
    recorded = None
    if m.pretrained:
        path = Path(m.pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"model.pretrained {m.pretrained}: no such file")
        recorded = read_record(path).get("normalize")
    return choose_normalize(m.normalize, recorded, force=m.force_normalize,
                            source=f"model.pretrained {m.pretrained}")


def set_cpu_threads(config: SearchConfig, data: Any) -> None:
    """CPU threads for the driver's own training (pretrain, retrain).

    ``trial.threads`` when set; otherwise one thread for tiny inputs (digits' 8x8), whose
    per-op work is too small to split (docs/benchmarks.md gives the figure). Larger
    inputs keep torch's default.
    """
    if config.trial.threads:
        torch.set_num_threads(config.trial.threads)
    elif data.input_size <= 16:
        torch.set_num_threads(1)


def _evaluate(model: torch.nn.Module, data: Any) -> tuple[float | None, float | None]:
    if data.family == "imagenet":  # too slow for the driver on a CPU: the trials measure it
        return None, None
    val = evaluate(model, data.val, "cpu")["acc"] if data.val is not None else None
    return val, evaluate(model, data.test, "cpu")["acc"]


def load_baseline_file(path: str | os.PathLike, config: SearchConfig, num_classes: int | None,
                       in_channels: int | None, input_size: int | None = None) -> Any:
    """Load a checkpoint and check that it is the config's unpruned architecture (at the
    data's ``input_size``, which decides the family of a cfg both families have)."""
    m = config.model
    if not Path(path).expanduser().is_file():
        raise UserError(f"model.pretrained {path}: no such file")
    entry = m.resolved_arch(input_size)
    loaded = load_checkpoint(str(Path(path).expanduser()), cfg=entry, data_set=m.data_set,
                             num_classes=num_classes, in_channels=in_channels)
    plan = entry.plan(config.sketch.start_conv)
    state = loaded.model.state_dict()
    for slot in plan.slots:
        w = state.get(slot.producer + ".weight")
        if w is None or w.shape[0] != slot.n:
            have = "missing" if w is None else f"{w.shape[0]} filters"
            raise UserError(f"model.pretrained {path} does not match the config: {slot.producer} "
                            f"is {have}, an unpruned {m.cfg} has {slot.n}; the search needs the "
                            f"unpruned baseline")
    return loaded


def check_pretrained(config: SearchConfig) -> None:
    """The checkpoint exists and holds the config's unpruned architecture (no data needed)."""
    load_baseline_file(config.model.pretrained, config, None, None)


def _pretrain(config: SearchConfig, data: Any, num_classes: int, target: Path) -> None:
    m, p = config.model, config.model.pretrain
    entry = m.resolved_arch(data.input_size)
    model = entry.build(None, num_classes, data.in_channels)
    print(f"[pretrain] no baseline for {m.cfg} on {m.data_set} with this recipe yet: training "
          f"one ({p.epochs} epochs, lr {p.lr}); cached as {target}", flush=True)
    out = prune_and_finetune(entry, model, None, None, p.recipe(), data, device="cpu",
                             outputs=Outputs(progress=sys.stderr.isatty()))
    model, result = out.model, out.fit  # the best epoch on the validation split
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(target), model, cfg=entry, num_classes=num_classes,
                    in_channels=data.in_channels,
                    metrics={"val_acc": result.best_val_acc, "epochs": p.epochs},
                    extra={"recipe_hash": recipe_hash(config)}, normalize=data.normalize,
                    split=split_record(config))


def _scoring_data(config: SearchConfig, normalize: Any) -> tuple[Any, dict]:
    """The data as the search scores it and the record of that choice, checked (sizes,
    images per trial) before anything trains; says in one line which images choose."""
    val_source, reason = choose_val_source(config)
    data = load_search_data(config.model, config.trial, {"val_source": val_source},
                            batch_size=config.model.pretrain.batch_size, normalize=normalize)
    check_images(config.trial.train_images, config.trial.val_images, data)
    scores = scores_record(val_source, reason, data, config.trial)
    print(f"[search] scores: {describe(scores)}, because {reason}", flush=True)
    return data, scores


def _obtain(config: SearchConfig, data: Any, scores: dict, num_classes: int,
            normalize: Any) -> tuple[str, Any]:
    """(source, loaded checkpoint): ``model.pretrained``, or the cached or newly pretrained
    baseline (trained with the validation split held out of the training split)."""
    m = config.model
    if m.pretrained:
        source = str(Path(m.pretrained).expanduser().resolve())
        return source, load_baseline_file(source, config, num_classes, data.in_channels,
                                          data.input_size)
    if m.data_set not in PRETRAINABLE:
        raise UserError(f"model.pretrained is empty: give the checkpoint of a trained "
                        f"{m.cfg} on {m.data_set} (or train one with `launch.py pretrain`); "
                        f"only {', '.join(PRETRAINABLE)} baselines are pretrained on the fly")
    target = cache_dir(config) / f"{m.cfg}-{m.data_set}-{recipe_hash(config)}.pt"
    if not target.is_file():
        train_data = data if scores["val_source"] == "train_holdout" else load_search_data(
            m, config.trial, None, batch_size=m.pretrain.batch_size, normalize=normalize)
        _pretrain(config, train_data, num_classes, target)
    else:
        print(f"[pretrain] cached baseline {target}", flush=True)
    return str(target), load_baseline_file(target, config, num_classes, data.in_channels,
                                           data.input_size)


def prepare_baseline(config: SearchConfig, exp_dir: Path | None) -> Baseline:
    """Load or pretrain the baseline, measure it (validation accuracy on the images that
    choose, test accuracy on those that report), and write ``exp_dir/baseline.pt``."""
    m = config.model
    t0 = time.time()
    normalize = search_normalize(config)
    data, scores = _scoring_data(config, normalize)
    set_cpu_threads(config, data)
    num_classes = m.num_classes or data.num_classes
    entry = m.resolved_arch(data.input_size)
    source, loaded = _obtain(config, data, scores, num_classes, normalize)
    pretrain_s = 0.0 if m.pretrained else time.time() - t0
    model = loaded.model.cpu().eval()
    flops, params = count_flops(model, data.shape)
    val_acc, test_acc = _evaluate(model, data)
    if test_acc is None and scores["val_source"] == "train_holdout":
        metrics = (loaded.meta or {}).get("metrics") or {}  # (on other images otherwise)
        val_acc, test_acc = metrics.get("val_acc"), metrics.get("test_acc")
    if exp_dir is not None:
        split = loaded.meta.get("split") if m.pretrained else split_record(config)
        save_checkpoint(str(exp_dir / "baseline.pt"), model, cfg=entry,
                        num_classes=num_classes, in_channels=data.in_channels,
                        metrics={"val_acc": val_acc, "test_acc": test_acc},
                        extra={"source": source}, normalize=data.normalize, split=split)
    return Baseline(state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                    num_classes=num_classes, in_channels=data.in_channels,
                    input_size=data.input_size, flops=flops, params=params, val_acc=val_acc,
                    test_acc=test_acc, source=source, pretrain_s=pretrain_s,
                    transform_input=bool(getattr(model, "transform_input", False)),
                    family=entry.family, normalize=as_record(data.normalize), scores=scores)


def baseline_dict(b: Any) -> dict:
    h = hashlib.sha256()
    for k in sorted(b.state):
        h.update(k.encode())
        h.update(str(tuple(b.state[k].shape)).encode())
        h.update(b.state[k].float().sum().item().hex().encode() if b.state[k].numel() else b"")
    d = b.summary()
    d.update(key=h.hexdigest()[:16], transform_input=b.transform_input)
    return d
