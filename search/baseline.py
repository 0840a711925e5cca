"""The unpruned baseline a search sketches: loaded from ``model.pretrained`` or pretrained.

With ``model.pretrained`` the checkpoint must match the config (architecture, classes,
input channels, unpruned widths). Without one, small data sets (digits, synthetic) get
a baseline trained with ``model.pretrain`` and cached under a hash of that recipe, so
the next search with the same recipe starts at once. Either way the experiment folder
receives ``baseline.pt`` (sketchtune format) and the manifest its FLOPs, parameters
and validation/test accuracy. Runs in the driver; no Ray.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from search.config import SearchConfig, recipe_hash
from sketch_core.atomic import atomic_copy
from sketch_core.errors import UserError

__all__ = ["Baseline", "prepare_baseline", "cache_dir", "load_search_data", "load_baseline_file",
           "check_pretrained", "set_cpu_threads", "search_normalize", "split_record"]

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

    def summary(self) -> dict[str, Any]:
        return {"flops": self.flops, "params": self.params, "val_acc": self.val_acc,
                "test_acc": self.test_acc, "source": self.source,
                "num_classes": self.num_classes, "in_channels": self.in_channels,
                "input_size": self.input_size, "family": self.family,
                "normalize": self.normalize}


def cache_dir(config: SearchConfig) -> Path:
    if config.model.pretrain.cache_dir:
        return Path(config.model.pretrain.cache_dir).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "sketchtune" / "baselines"


def load_search_data(config: SearchConfig, batch_size: int | None = None, device: str = "cpu",
                     normalize: Any = None):
    """The data set with the search's validation split (same fraction and seed everywhere);
    ``normalize`` as :func:`sketch_core.data.load_data` takes it (None: the data set's own)."""
    from sketch_core.data import load_data

    m, t = config.model, config.trial
    return load_data(m.data_set, m.data_path, batch_size=batch_size or t.batch_size,
                     eval_batch_size=t.eval_batch_size, val_fraction=t.val_fraction,
                     seed=t.seed, device=device, download=m.download,
                     input_size=m.input_size, synthetic=m.synthetic, normalize=normalize)


def search_normalize(config: SearchConfig) -> Any:
    """The ``(mean, std)`` the search normalises with: ``model.normalize`` when set (an
    error when it contradicts ``model.pretrained``'s record, unless
    ``model.force_normalize``), else the record, else None (the data set's own)."""
    from sketch_core.checkpoint import read_record
    from sketch_core.normalize import choose_normalize

    m = config.model
    recorded = None
    if m.pretrained:
        path = Path(m.pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"model.pretrained {m.pretrained}: no such file")
        recorded = read_record(path).get("normalize")
    return choose_normalize(m.normalize, recorded, force=m.force_normalize,
                            source=f"model.pretrained {m.pretrained}")


def split_record(config: SearchConfig) -> dict[str, Any]:
    """The training split of the search (what a checkpoint records as ``split``)."""
    m, t = config.model, config.trial
    path = str(Path(m.data_path).expanduser().resolve()) if m.data_path else None
    return {"data_set": m.data_set, "data_path": path, "seed": t.seed,
            "val_fraction": t.val_fraction}


def _say_split(config: SearchConfig, split: dict | None, source: str) -> None:
    """Whether the validation split holds images the baseline never trained on."""
    if not split:
        return
    if split == split_record(config):
        print(f"[pretrain] {source} was trained on this search's training split: its "
              f"validation images are unseen", flush=True)
    else:
        print(f"[pretrain] warning: {source} was trained on another split "
              f"({', '.join(f'{k} {v}' for k, v in split.items())}): the search's validation "
              f"images may include some it trained on", flush=True)


def set_cpu_threads(config: SearchConfig, data: Any) -> None:
    """CPU threads for the driver's own training (pretrain, retrain).

    ``trial.threads`` when set; otherwise one thread for tiny inputs (digits' 8x8), where
    measured: one thread ran an epoch 2.7x faster than two on a 2-core machine, since
    the per-op work is too small to split. Larger inputs keep torch's default.
    """
    if config.trial.threads:
        torch.set_num_threads(config.trial.threads)
    elif data.input_size <= 16:
        torch.set_num_threads(1)


def _evaluate(model: torch.nn.Module, data: Any) -> tuple[float | None, float | None]:
    from sketch_core.train import evaluate

    if data.family == "imagenet":  # too slow for the driver on a CPU: the trials measure it
        return None, None
    val = evaluate(model, data.val, "cpu")["acc"] if data.val is not None else None
    return val, evaluate(model, data.test, "cpu")["acc"]


def load_baseline_file(path: str | os.PathLike, config: SearchConfig, num_classes: int | None,
                       in_channels: int | None, input_size: int | None = None) -> Any:
    """Load a checkpoint and check that it is the config's unpruned architecture (at the
    data's ``input_size``, which decides the family of a cfg both families have)."""
    from sketch_core.checkpoint import load_checkpoint

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
    from sketch_core.checkpoint import save_checkpoint
    from sketch_core.train import fit

    m, p = config.model, config.model.pretrain
    entry = m.resolved_arch(data.input_size)
    model = entry.build(None, num_classes, data.in_channels)
    print(f"[pretrain] no baseline for {m.cfg} on {m.data_set} with this recipe yet: training "
          f"one ({p.epochs} epochs, lr {p.lr}); cached as {target}", flush=True)
    result = fit(model, data, epochs=p.epochs, lr=p.lr, lr_decay_step=p.lr_decay_step,
                 weight_decay=p.weight_decay, seed=p.seed, device="cpu",
                 progress=sys.stderr.isatty())
    model.load_state_dict(result.best_state)  # best epoch on the validation split
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(target), model, cfg=entry, num_classes=num_classes,
                    in_channels=data.in_channels,
                    metrics={"val_acc": result.best_val_acc, "epochs": p.epochs},
                    extra={"recipe_hash": recipe_hash(config)}, normalize=data.normalize,
                    split=split_record(config))


def prepare_baseline(config: SearchConfig, exp_dir: Path | None) -> Baseline:
    """Load or pretrain the baseline, measure it, and write ``exp_dir/baseline.pt``."""
    from sketch_core.checkpoint import save_checkpoint
    from sketch_core.flops import count_flops

    from sketch_core.normalize import as_record

    m = config.model
    t0 = time.time()
    normalize = search_normalize(config)
    data = load_search_data(config, batch_size=m.pretrain.batch_size, normalize=normalize)
    from search.trainable import check_trial_images

    check_trial_images(config.trial, data)  # before anything trains
    set_cpu_threads(config, data)
    num_classes = m.num_classes or data.num_classes
    entry = m.resolved_arch(data.input_size)
    if m.pretrained:
        source = str(Path(m.pretrained).expanduser().resolve())
        loaded = load_baseline_file(source, config, num_classes, data.in_channels,
                                    data.input_size)
        _say_split(config, loaded.meta.get("split"), f"model.pretrained {m.pretrained}")
        pretrain_s = 0.0
    else:
        if m.data_set not in PRETRAINABLE:
            raise UserError(f"model.pretrained is empty: give the checkpoint of a trained "
                            f"{m.cfg} on {m.data_set} (or train one with `launch.py pretrain`); "
                            f"only {', '.join(PRETRAINABLE)} baselines are pretrained on the fly")
        target = cache_dir(config) / f"{m.cfg}-{m.data_set}-{recipe_hash(config)}.pt"
        if not target.is_file():
            _pretrain(config, data, num_classes, target)
        else:
            print(f"[pretrain] cached baseline {target}", flush=True)
        source = str(target)
        loaded = load_baseline_file(target, config, num_classes, data.in_channels,
                                    data.input_size)
        pretrain_s = time.time() - t0
    model = loaded.model.cpu().eval()
    flops, params = count_flops(model, data.shape)
    val_acc, test_acc = _evaluate(model, data)
    if test_acc is None:
        metrics = (loaded.meta or {}).get("metrics") or {}
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
                    family=entry.family, normalize=as_record(data.normalize))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    atomic_copy(src, dst)
