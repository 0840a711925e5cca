"""Export of a sketchtune model: ONNX or a ``torch.export`` program, checked on a batch.

The exported graph is the network on *normalised* input, exactly the PyTorch module
(no preprocessing inside): it takes float32 NCHW images already normalised as
``(pixel in [0, 1] - mean) / std`` per channel and returns logits. The metadata says
so and carries mean and std, so a deployment applies them before the graph.

Metadata (all values strings, lists and dicts as JSON): ``producer`` (sketchtune),
``family``, ``cfg``, ``arch``, ``num_classes``, ``in_channels``, ``rates``,
``widths``, ``input_shape`` ([C, H, W]), ``batch`` (a number, or ``dynamic``),
``input`` (what the graph expects), ``normalize`` ({"mean": [...], "std": [...]}, or
null when unknown), ``normalize_source`` (checkpoint, or the family's default),
``output`` (logits) and ``torch_version``. ONNX files hold it as ``metadata_props``;
``.pt2`` files as ``extra_files`` (``torch.export.load(path, extra_files={key: ""})``).

Every file is written whole or not at all (a temporary file beside it, checked by
running it, then renamed). ONNX needs the ``export`` extra (onnx, onnxscript,
onnxruntime); ``pt2`` needs torch only.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sketch_core.io.atomic import atomic_write
from sketch_core.errors import UserError
from sketch_core.cost.flops import input_shape as shape_of
from sketch_core.io.checkpoint import FORMAT, load_checkpoint, read_checkpoint
from sketch_core.data.sets import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["FORMATS", "ExportResult", "export_model", "export_checkpoint", "check_format",
           "check_output_path", "run_exported", "read_metadata", "example_batch",
           "onnx_model_bytes", "require_onnx", "checkpoint_normalize", "prepare_checkpoint", "trace"]

FORMATS = ("onnx", "pt2")
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
INPUT_DOC = ("float32 NCHW images normalised per channel as (pixel in [0, 1] - mean) / std "
             "(mean and std under 'normalize'); the graph does not normalise")


@dataclass
class ExportResult:
    """What one export wrote and how far its logits are from PyTorch's."""

    path: Path
    format: str
    max_abs_diff: float
    metadata: dict[str, str] = field(default_factory=dict)


def check_format(to: str) -> str:
    """``to`` when it is a known format; otherwise a UserError naming the closest one."""
    if to in FORMATS:
        return to
    close = difflib.get_close_matches(str(to), FORMATS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"unknown --to {to!r}{hint}; expected one of: {', '.join(FORMATS)}")


def require_onnx() -> None:
    """A UserError saying what to install when onnx, onnxscript or onnxruntime is missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)} (not installed); install the "
                        f"export extra: pip install 'sketchtune[export]'")


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """The output path, when its folder exists and it does not (or ``force``)."""
    p = Path(path).expanduser()
    if not p.parent.is_dir():
        raise UserError(f"--out {p}: folder {p.parent} does not exist (create it first)")
    if p.is_dir():
        raise UserError(f"--out {p} is a folder; expected a file name")
    if p.exists() and not force:
        raise UserError(f"--out {p} exists; pass --force to replace it")
    return p


def example_batch(input_shape: tuple[int, ...], batch: int, seed: int = 0) -> torch.Tensor:
    """The fixed, seeded float32 batch exports are traced and checked on."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_shape), generator=gen, dtype=torch.float32)


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with its chatter to stdout/stderr captured; on failure, re-raise."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        return fn(*args, **kwargs)


def trace(model: nn.Module, input_shape: tuple[int, ...], *, batch: int = 1,
          dynamic_batch: bool = False, seed: int = 0) -> torch.export.ExportedProgram:
    """The ``torch.export`` program :func:`export_model` would trace (model in eval mode)."""
    model.eval()
    x = example_batch(tuple(input_shape), max(batch, 2) if dynamic_batch else batch, seed)
    return _program(model, x, dynamic_batch)


def _program(model: nn.Module, x: torch.Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    shapes = None
    if dynamic_batch:
        shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    return _quiet(torch.export.export, model, (x,), dynamic_shapes=shapes)


def onnx_model_bytes(model: nn.Module, x: torch.Tensor, *, dynamic_batch: bool = False,
                     metadata: dict[str, str] | None = None,
                     program: torch.export.ExportedProgram | None = None) -> bytes:
    """The serialised ONNX model of ``model`` traced on ``x`` (the installed torch's
    exporter and default opset), with ``metadata`` as metadata_props, checked with
    ``onnx.checker``."""
    require_onnx()
    import onnx  # optional: onnx, the export extra

    program = program if program is not None else _program(model, x, dynamic_batch)
    onnx_prog = _quiet(torch.onnx.export, program, (x,), dynamo=True, input_names=[INPUT_NAME],
                       output_names=[OUTPUT_NAME], external_data=False)
    proto = onnx_prog.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def run_exported(path: str | os.PathLike, to: str, x: torch.Tensor) -> torch.Tensor:
    """The logits an exported file computes for ``x`` (onnxruntime on the CPU for ONNX,
    ``torch.export.load`` for pt2)."""
    check_format(to)
    if to == "onnx":
        require_onnx()
        import onnxruntime as ort  # optional: onnxruntime, the export extra

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)
    with open(path, "rb") as f:  # a buffer: the file name need not end in .pt2
        program = torch.export.load(f)
    with torch.no_grad():
        return program.module()(x)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata an exported file carries (by its suffix: .onnx, else pt2)."""
    p = Path(path)
    if p.suffix == ".onnx":
        require_onnx()
        import onnx  # optional: onnx, the export extra

        proto = onnx.load(str(p), load_external_data=False)
        return {e.key: e.value for e in proto.metadata_props}
    keys = ("producer", "family", "cfg", "arch", "num_classes", "in_channels", "rates", "widths",
            "input_shape", "batch", "input", "normalize", "normalize_source", "output",
            "torch_version")
    extra = dict.fromkeys(keys, "")
    with open(p, "rb") as f:
        torch.export.load(f, extra_files=extra)
    return {k: v for k, v in extra.items() if v != ""}


def export_model(model: nn.Module, path: str | os.PathLike, *, to: str,
                 input_shape: tuple[int, ...], batch: int = 1, dynamic_batch: bool = False,
                 metadata: dict[str, str] | None = None, seed: int = 0,
                 program: torch.export.ExportedProgram | None = None) -> ExportResult:
    """Export ``model`` (in eval mode, on the CPU) to ``path`` and check it.

    The file is traced on a seeded batch of ``batch`` inputs of ``input_shape`` (C, H, W)
    (at least 2 with ``dynamic_batch``, whose graph takes any batch size), run on the
    same batch and compared with the module's logits; the largest absolute difference
    is returned. The file is written atomically, only once it ran. ``program`` (from
    :func:`trace`, same model and arguments) saves tracing again for a second format.
    """
    check_format(to)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    if to == "onnx":
        require_onnx()
    path = Path(path)
    was_training = model.training
    model = model.cpu().eval()
    x = example_batch(tuple(input_shape), max(batch, 2) if dynamic_batch else batch, seed)
    meta = dict(metadata or {})
    meta.setdefault("batch", "dynamic" if dynamic_batch else str(batch))
    try:
        with torch.no_grad():
            want = model(x)
        if program is None:
            program = _program(model, x, dynamic_batch)
        diff: list[float] = []

        def write(tmp: str) -> None:
            if to == "onnx":
                data = onnx_model_bytes(model, x, dynamic_batch=dynamic_batch, metadata=meta,
                                        program=program)
                with open(tmp, "wb") as f:
                    f.write(data)
            else:
                with open(tmp, "wb") as f:
                    torch.export.save(program, f, extra_files=meta)
            got = run_exported(tmp, to, x)
            diff.append(float((got.float() - want.float()).abs().max()))

        atomic_write(path, write)
    finally:
        model.train(was_training)
    return ExportResult(path, to, diff[0], meta)


def _describe(obj: Any) -> str:
    """What a file that is not a sketchtune checkpoint holds, in a few words."""
    if isinstance(obj, dict):
        if "state_dict" in obj or (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
            return "a bare state_dict (an original FilterSketch or torchvision file)"
        if "format" in obj:
            return f"a file of format {obj['format']!r}"
        return f"a dict with keys {', '.join(map(str, list(obj)[:4]))}"
    return f"a {type(obj).__name__}"


def _make_one() -> str:
    return "make one with `launch.py sketch` (its model_best.pt) or `launch.py pretrain --init`"


def checkpoint_normalize(raw: dict, meta: dict, family: str,
                         in_channels: int) -> tuple[dict | None, str]:
    """(normalize record, where it came from): the checkpoint's own when it has one,
    else the family's default (CIFAR's or ImageNet's mean/std) when the channel count
    matches, else unknown (None)."""
    extra = raw.get("extra") if isinstance(raw.get("extra"), dict) else {}
    for src in (meta.get("normalize"), raw.get("normalize"), extra.get("normalize")):
        rec = _as_norm(src)
        if rec is not None:
            return rec, "checkpoint"
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if family == "imagenet" else (CIFAR_MEAN, CIFAR_STD)
    if len(mean) == in_channels:
        return {"mean": list(mean), "std": list(std)}, f"default of the {family} family"
    return None, "unknown (the checkpoint records none)"


def _as_norm(src: Any) -> dict | None:
    """A {"mean", "std"} record from a dict or a (mean, std) pair; None for anything else."""
    try:
        if isinstance(src, dict) and "mean" in src and "std" in src:
            mean, std = src["mean"], src["std"]
        elif isinstance(src, (list, tuple)) and len(src) == 2:
            mean, std = src
        else:
            return None
        return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    except (TypeError, ValueError):
        return None


def export_checkpoint(checkpoint: str | os.PathLike, *, to: str, out: str | os.PathLike | None = None,
                      batch: int = 1, dynamic_batch: bool = False, force: bool = False,
                      input_size: int | None = None,
                      normalize: tuple | dict | None = None) -> ExportResult:
    """Export a sketchtune checkpoint (``out`` default: the checkpoint's name with
    ``.onnx``/``.pt2``); see :func:`export_model` and the module doc for the metadata.

    ``input_size`` defaults to the checkpoint's own (when recorded), else the family's
    (32 CIFAR, 224 ImageNet); ``normalize`` (mean, std) overrides what the checkpoint says.
    """
    check_format(to)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    if to == "onnx":
        require_onnx()
    src = Path(checkpoint).expanduser()
    path = check_output_path(out if out is not None else src.with_suffix(SUFFIX[to]), force)
    model, shape, metadata = prepare_checkpoint(src, input_size=input_size, normalize=normalize)
    return export_model(model, path, to=to, input_shape=shape, batch=batch,
                        dynamic_batch=dynamic_batch, metadata=metadata)


def prepare_checkpoint(checkpoint: str | os.PathLike, *, input_size: int | None = None,
                       normalize: tuple | dict | None = None
                       ) -> tuple[nn.Module, tuple[int, int, int], dict[str, str]]:
    """(model, input shape (C, H, W), metadata) of a sketchtune checkpoint, as
    :func:`export_checkpoint` exports them; a UserError for any other file."""
    src = Path(checkpoint).expanduser()
    try:
        raw = read_checkpoint(src)
    except UserError as exc:
        raise UserError(f"{exc}; export takes a sketchtune checkpoint: {_make_one()}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{src} is not a sketchtune checkpoint: it holds {_describe(raw)}; "
                        f"{_make_one()}")
    loaded = load_checkpoint(src)
    meta = loaded.meta
    extra = raw.get("extra") if isinstance(raw.get("extra"), dict) else {}
    size = input_size or meta.get("input_size") or raw.get("input_size") or extra.get("input_size")
    shape = shape_of(meta["family"], meta["in_channels"], int(size) if size else None)
    if normalize is not None:
        norm, norm_src = _as_norm(normalize), "given"
        if norm is None:
            raise UserError(f"normalize takes (mean, std) or {{'mean', 'std'}}, got {normalize!r}")
    else:
        norm, norm_src = checkpoint_normalize(raw, meta, meta["family"], meta["in_channels"])
    metadata = {
        "producer": "sketchtune", "family": meta["family"], "cfg": meta["cfg"], "arch": meta["arch"],
        "num_classes": str(meta["num_classes"]), "in_channels": str(meta["in_channels"]),
        "rates": json.dumps(meta.get("rates")), "widths": json.dumps(meta["widths"]),
        "input_shape": json.dumps(list(shape)), "input": INPUT_DOC, "normalize": json.dumps(norm),
        "normalize_source": norm_src, "output": "logits", "torch_version": torch.__version__,
    }
    return loaded.model, shape, metadata
