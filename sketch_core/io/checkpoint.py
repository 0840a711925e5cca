"""Checkpoints: the original FilterSketch files, torchvision's files, sketchtune's own.

Every file is read with ``torch.load(..., weights_only=True)``: a pickle that would run
code is refused, never executed. sketchtune's format is a plain dict: the model's
description (family, cfg, num_classes, in_channels, rates, widths, the input
normalisation it was trained with and its training split) plus a state_dict of plain
tensors and metrics; no pickled modules. Widths of a pruned original-format file
follow from its tensor shapes. Saving is atomic: a temporary file, then a rename.

Layouts read as they are: a ``module.`` prefix (``DataParallel``) is stripped, extra
top-level entries (``best_prec1``, ``epoch``, ...) are ignored, a classifier saved as
``fc``, ``linear`` or ``classifier`` is read as the model's own head (and the load says
so), and a BatchNorm ``num_batches_tracked`` counter that files from before PyTorch
1.0 lack is filled with 0, as PyTorch's own BatchNorm loader does. Every other key
must be present with its exact shape.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sketch_core.io.atomic import atomic_torch_save
from sketch_core.errors import UserError
from sketch_core.data.normalize import Normalization, as_record, from_record
from sketch_core.registry import Arch, CfgLike, family_of, resolve_arch
from sketch_core.pruning.prune import model_io
from sketch_core.models.imagenet_densenet import remap_legacy_keys

__all__ = ["LoadedModel", "load_checkpoint", "save_checkpoint", "read_checkpoint", "read_record",
           "atomic_save",
           "FORMAT", "HEAD_NAMES"]

FORMAT = "sketchtune"
VERSION = 1
HEAD_NAMES = ("fc", "linear", "classifier")  # names a saved classifier is read under

log = logging.getLogger("sketchtune.checkpoint")


@dataclass
class LoadedModel:
    model: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically (:mod:`sketch_core.io.atomic`)."""
    atomic_torch_save(obj, path)


def read_checkpoint(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True and one clear error for every way a file is bad."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist")
    if not p.is_file():
        raise UserError(f"checkpoint {p} is not a file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UserError(f"checkpoint {p} holds Python objects that would run code when loaded "
                            f"(refused; expected plain tensors and a state_dict)") from None
        raise UserError(f"{p} is not a checkpoint ({first or 'unreadable pickle'})") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read means a bad file
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{p} is truncated or not a checkpoint ({first})") from None


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """What a sketchtune checkpoint says about its network besides the weights: ``family``,
    ``cfg``, ``normalize`` (``(mean, std)`` or None) and ``split``; ``{}`` for files of the
    other formats, which record none of it."""
    obj = read_checkpoint(Path(path).expanduser())
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return {}
    return {"family": obj.get("family"), "cfg": obj.get("cfg"),
            "normalize": from_record(obj.get("normalize")), "split": obj.get("split")}


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _state_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state_dict (expected a dict of tensors, or a dict with "
                        f"'state_dict')")
    return _strip_prefix(dict(obj))


def _check_match(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise UserError(f"checkpoint does not match {what}: key {k} (shape {tuple(v.shape)}) is "
                            f"missing from the file{_depth_hint(state, what)}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"checkpoint does not match {what}: {k} has shape "
                            f"{tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model")
    extra = [k for k in state if k not in own]
    if extra:
        raise UserError(f"checkpoint does not match {what}: unexpected key {extra[0]} (shape "
                        f"{tuple(state[extra[0]].shape)}) in the file{_depth_hint(state, what)}")


def _depth_hint(state: dict[str, torch.Tensor], what: str) -> str:
    """For a CIFAR ResNet: the depth the file's blocks make, when it is another one."""
    if not what.startswith("cifar resnet"):
        return ""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("layer1.") and k.split(".")[1].isdigit()}
    if not blocks:
        return ""
    depth = 6 * (max(blocks) + 1) + 2
    return "" if what == f"cifar resnet{depth}" else f" (the file holds a resnet{depth})"


def _map_head(state: dict[str, torch.Tensor], head: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a classifier saved under another of :data:`HEAD_NAMES` as the model's ``head``.

    Only when the file has no ``head.*`` key and exactly one other name's weight and
    bias; returns the state and the name that was read (None when nothing changed).
    """
    if head not in HEAD_NAMES or any(k.startswith(head + ".") for k in state):
        return state, None
    found = [n for n in HEAD_NAMES if n != head and {k for k in state if k.startswith(n + ".")}
             == {f"{n}.weight", f"{n}.bias"}]
    if len(found) != 1:
        return state, None
    src = found[0]
    mapped = {(head + k[len(src):] if k.startswith(src + ".") else k): v for k, v in state.items()}
    log.info("head %r read as %r", src, head)
    return mapped, src


def _fill_bn_counters(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Add the ``num_batches_tracked`` counters a file lacks (0, as BatchNorm's loader does)."""
    filled = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            key = f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            if key not in state and f"{name}.running_mean" in state:
                state[key] = torch.tensor(0, dtype=torch.long)
                filled += 1
    return filled


def _classifier(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def _first_conv(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][0]


def _torchvision_fixups(state: dict[str, torch.Tensor], entry) -> tuple[dict[str, torch.Tensor], dict]:
    """Released torchvision files: DenseNet's legacy keys, GoogLeNet's aux heads."""
    notes: dict[str, Any] = {}
    if entry.family != "imagenet":
        return state, notes
    if entry.arch == "densenet" and any(".norm.1" in k or ".conv.1" in k for k in state):
        state = remap_legacy_keys(state)
        notes["legacy_keys"] = True
    if entry.arch == "googlenet" and any(k.startswith(("aux1.", "aux2.")) for k in state):
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
        notes["transform_input"] = True
    return state, notes


@dataclass
class _Read:
    """What a checkpoint file gives to build its model from."""

    entry: Arch
    state: dict
    widths: list[int]
    num_classes: int
    in_channels: int
    transform_input: bool | None


def _check_classes(p: Path, ncls: int, num_classes: int | None) -> None:
    if num_classes is not None and num_classes != ncls:
        raise UserError(f"{p} has {ncls} classes; the data set has {num_classes}")


def _read_own(obj: dict, p: Path, cfg: CfgLike | None, data_set: str,
              num_classes: int | None, meta: dict) -> _Read:
    """A sketchtune file: it describes itself (checked against ``cfg`` when given)."""
    fam, file_cfg = obj["family"], obj["cfg"]
    want = cfg.cfg if isinstance(cfg, Arch) else cfg
    if want is not None and want != file_cfg:
        raise UserError(f"{p} holds a {fam} {file_cfg}, not a {want}")
    if cfg is not None:
        want_fam = cfg.family if isinstance(cfg, Arch) else family_of(data_set, cfg)
        if want_fam != fam:
            what = "the architecture asked for" if isinstance(cfg, Arch) else f"data set {data_set}"
            raise UserError(f"{p} holds a {fam}-family {file_cfg}; {what} uses the "
                            f"{want_fam} family")
    entry = resolve_arch(file_cfg, family=fam)
    ncls = int(obj["num_classes"])
    _check_classes(p, ncls, num_classes)
    meta.update({k: obj.get(k) for k in ("rates", "metrics", "extra", "sketch_options", "split")})
    meta["normalize"] = from_record(obj.get("normalize"))
    meta["format"] = FORMAT
    return _Read(entry, obj["state_dict"], list(obj.get("widths") or entry.plan().full_widths()),
                 ncls, int(obj.get("in_channels", 3)), obj.get("transform_input"))


def _slot_widths(state: dict, entry: Arch) -> list[int]:
    """Each slot's width, read from its producer's weight in ``state``."""
    widths = []
    for s in entry.plan().slots:
        key = s.producer + ".weight"
        if key not in state:
            with torch.device("meta"):
                shape = tuple(entry.build(None, 10, 3).state_dict()[key].shape)
            raise UserError(f"checkpoint does not match {entry.family} {entry.cfg}: key {key} "
                            f"(shape {shape} unpruned) is missing from the file"
                            f"{_depth_hint(state, f'{entry.family} {entry.cfg}')}")
        widths.append(int(state[key].shape[0]))
    return widths


def _read_foreign(obj: Any, p: Path, cfg: CfgLike | None, data_set: str,
                  num_classes: int | None, meta: dict) -> _Read:
    """An original-project, public or torchvision file: ``cfg`` says what it holds, the
    tensor shapes give the widths and the head."""
    if cfg is None:
        raise UserError(f"{p} is not a sketchtune checkpoint; say which model it holds with --cfg")
    entry = resolve_arch(cfg, data_set)
    state, notes = _torchvision_fixups(_state_of(obj, p), entry)
    meta.update(notes)
    meta["format"] = "state_dict"
    widths = _slot_widths(state, entry)
    with torch.device("meta"):
        probe = entry.build(widths, 10, 3)
    head = _classifier(probe)
    state, head_src = _map_head(state, head)
    if head_src is not None:
        meta["head_renamed"] = [head_src, head]
        meta["messages"] = [f"head {head_src!r} read as {head!r}"]
    cls_key, conv_key = head + ".weight", _first_conv(probe) + ".weight"
    if cls_key not in state or conv_key not in state:
        missing = cls_key if cls_key not in state else conv_key
        raise UserError(f"checkpoint does not match {entry.family} {entry.cfg}: key {missing} "
                        f"is missing from the file")
    ncls = int(state[cls_key].shape[0])
    _check_classes(p, ncls, num_classes)
    plan = entry.plan()
    meta["rates"] = [round(widths[slots[0]] / plan.slots[slots[0]].n, 6) for slots in plan.units]
    return _Read(entry, state, widths, ncls, int(state[conv_key].shape[1]),
                 notes.get("transform_input"))


def load_checkpoint(path: str | os.PathLike, cfg: CfgLike | None = None, data_set: str = "cifar10",
                    num_classes: int | None = None, in_channels: int | None = None,
                    transform_input: bool | None = None) -> LoadedModel:
    """Build the model a checkpoint describes and load it strictly.

    sketchtune files describe themselves; original-project and torchvision files need
    ``cfg`` (a name, with ``data_set`` for the family, or a resolved :class:`Arch`);
    their widths come from tensor shapes.
    """
    p = Path(path)
    obj = read_checkpoint(p)
    meta: dict[str, Any] = {"path": str(p)}
    own = isinstance(obj, dict) and obj.get("format") == FORMAT
    r = (_read_own if own else _read_foreign)(obj, p, cfg, data_set, num_classes, meta)
    if in_channels is not None and in_channels != r.in_channels:
        raise UserError(f"{p} takes {r.in_channels} input channels; the data set has {in_channels}")
    entry, state = r.entry, r.state
    model = entry.build(r.widths, r.num_classes, r.in_channels)
    tin = r.transform_input if transform_input is None else transform_input
    if tin and hasattr(model, "transform_input"):
        model.transform_input = True
    if not own:
        state = dict(state)
        filled = _fill_bn_counters(model, state)
        if filled:
            meta["filled_bn_counters"] = filled
    _check_match(model, state, f"{entry.family} {entry.cfg}")
    model.load_state_dict(state, strict=True)
    meta.update({"family": entry.family, "cfg": entry.cfg, "arch": entry.arch,
                 "num_classes": r.num_classes, "in_channels": r.in_channels, "widths": r.widths,
                 "pruned": r.widths != entry.plan().full_widths()})
    return LoadedModel(model, meta)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, cfg: CfgLike, data_set: str = "cifar10",
                    num_classes: int | None = None, in_channels: int | None = None,
                    rates: list[float] | None = None, widths: list[int] | None = None,
                    metrics: dict | None = None, extra: dict | None = None,
                    sketch_options: dict | None = None, normalize: Normalization | None = None,
                    split: dict | None = None) -> None:
    """Write a sketchtune checkpoint atomically (description + plain tensors).

    ``normalize`` records the ``(mean, std)`` the network was trained with (later runs
    use it; :func:`load_checkpoint` returns it as ``meta["normalize"]``); ``split`` the
    training split it saw (data_set, data_path, seed, val_fraction), as ``meta["split"]``.
    """
    entry = resolve_arch(cfg, data_set)
    if widths is None:
        widths = getattr(model, "sketch_widths", None) or [
            int(model.state_dict()[s.producer + ".weight"].shape[0]) for s in entry.plan().slots]

    inch, ncls = model_io(model)
    obj = {
        "format": FORMAT, "version": VERSION, "family": entry.family, "cfg": entry.cfg,
        "arch": entry.arch, "num_classes": int(num_classes or ncls), "in_channels": int(in_channels or inch),
        "rates": [float(r) for r in rates] if rates is not None else None,
        "widths": [int(w) for w in widths],
        "transform_input": bool(getattr(model, "transform_input", False)),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "metrics": metrics or {}, "extra": extra or {}, "sketch_options": sketch_options or {},
    }
    if normalize is not None:
        obj["normalize"] = as_record(normalize)
    if split is not None:
        obj["split"] = dict(split)
    atomic_save(obj, path)
