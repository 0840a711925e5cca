"""Measured latency of a module: median and spread over timed repeats after a warm-up.

:func:`measure_latency` times any ``nn.Module`` on a fixed input (a whole network, or
one layer with its own input shape, which is what a per-layer latency table is built
from) in eager PyTorch or in onnxruntime, on the CPU with a fixed thread count or on
CUDA. CUDA times are CUDA events around each call (the device is synchronised after
each); CPU times are ``time.perf_counter`` around each call. :func:`time_calls` is
the timing loop itself, for any callable.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from sketch_core.errors import UserError
from sketch_core.io.export import onnx_model_bytes

__all__ = ["LatencyStats", "measure_latency", "time_calls", "summarize", "check_latency_args",
           "paired_ratios", "DEVICES", "RUNTIMES"]

DEVICES = ("cpu", "cuda")
RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one call, in milliseconds, over ``repeats`` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    warmup: int
    device: str
    runtime: str
    batch: int
    threads: int | None  # the CPU thread count the calls ran with (None on CUDA)
    input_shape: tuple[int, ...]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out


def _quantile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated quantile of a sorted list."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def summarize(times_ms: list[float], **info) -> LatencyStats:
    """A :class:`LatencyStats` of raw times (ms); ``info`` fills the descriptive fields."""
    if not times_ms:
        raise ValueError("no times to summarise")
    s = sorted(times_ms)
    return LatencyStats(median_ms=statistics.median(s), p10_ms=_quantile(s, 0.1),
                        p90_ms=_quantile(s, 0.9), min_ms=s[0], mean_ms=statistics.fmean(s),
                        repeats=len(s), **info)


def check_latency_args(device: str, runtime: str, batch: int = 1, threads: int | None = None,
                       repeats: int = 1, warmup: int = 0) -> None:
    """One UserError for a device, runtime or count that cannot be measured here."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown --runtime {runtime!r}; expected one of: {', '.join(RUNTIMES)}")
    if device not in DEVICES:
        raise UserError(f"unknown --latency_device {device!r}; expected one of: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--latency_device cuda: no CUDA device is available (torch "
                        f"{torch.__version__} sees none); use --latency_device cpu")
    if runtime == "onnxruntime":
        try:
            import onnxruntime as ort  # optional: onnxruntime, the export extra
        except ImportError:
            raise UserError("--runtime onnxruntime needs onnx, onnxscript and onnxruntime; install "
                            "the export extra: pip install 'sketchtune[export]'") from None
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("--runtime onnxruntime --latency_device cuda: this onnxruntime has no "
                            "CUDAExecutionProvider (install onnxruntime-gpu), or use --runtime torch")
    for name, value, least in (("--latency_batch", batch, 1), ("--threads", threads, 1),
                               ("--latency_repeats", repeats, 1), ("warmup", warmup, 0)):
        if value is not None and value < least:
            raise UserError(f"{name} must be at least {least}, got {value}")


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def time_calls(fn: Callable[[], object], *, repeats: int, warmup: int,
               cuda: bool = False) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    With ``cuda``, each call is timed by a pair of CUDA events and the device is
    synchronised after each, so calls do not overlap.
    """
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out: list[float] = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _ort_session(model: nn.Module, x: torch.Tensor, device: str, threads: int | None):
    import onnxruntime as ort  # optional: onnxruntime, the export extra


    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(onnx_model_bytes(model, x), sess_options=opts, providers=providers)
    return sess


def _caller(model: nn.Module, x: torch.Tensor, device: str, runtime: str,
            threads: int) -> tuple[Callable[[], object], bool]:
    """A no-argument call of ``model`` on ``x`` in ``runtime`` on ``device``, and whether
    it runs on CUDA (the model is moved there; the caller moves it back)."""
    if runtime == "onnxruntime":
        sess = _ort_session(model.cpu(), x, device, threads)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        return (lambda: sess.run(None, feed)), False
    dev = torch.device(device)
    m, xd = model.to(dev), x.to(dev)
    return (lambda: m(xd)), dev.type == "cuda"


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, device: str = "cpu",
                    batch: int = 1, threads: int | None = None, runtime: str = "torch",
                    repeats: int = 30, warmup: int = 5) -> LatencyStats:
    """Latency of ``model`` (in eval mode, no autograd) on a batch of ``input_shape`` inputs.

    ``input_shape`` is one input's shape without the batch (``(C, H, W)`` for a network,
    or a layer's own input). ``threads`` fixes the CPU thread count (torch's, or
    onnxruntime's intra-op count; None keeps torch's current count, which is then
    recorded); ``runtime`` is ``torch`` (eager) or ``onnxruntime`` (the model exported
    to ONNX in memory first). The model's own training mode and device are restored.
    """
    check_latency_args(device, runtime, batch, threads, repeats, warmup)
    shape = tuple(int(s) for s in input_shape)
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    params = next(iter(model.parameters()), None)
    home = params.device if params is not None else torch.device("cpu")
    model.eval()
    info = dict(warmup=warmup, device=device, runtime=runtime, batch=batch, input_shape=shape)
    try:
        with _torch_threads(threads) as used, torch.inference_mode():
            call, cuda = _caller(model, x, device, runtime, threads or used)
            times = time_calls(call, repeats=repeats, warmup=warmup, cuda=cuda)
    finally:
        model.to(home).train(was_training)
    return summarize(times, threads=None if device == "cuda" and runtime == "torch"
                     else (threads or used), **info)


def paired_ratios(model: nn.Module, ref: nn.Module, input_shape: tuple[int, ...], *,
                  device: str = "cpu", batch: int = 1, threads: int | None = None,
                  runtime: str = "torch", repeats: int = 10, warmup: int = 3
                  ) -> tuple[list[float], list[float]]:
    """``model``'s time over ``ref``'s, call by call: the two are called alternately
    (``warmup`` untimed pairs first), so other work on the machine slows both calls of a
    pair alike. Returns the ``repeats`` ratios and ``ref``'s times (ms)."""
    check_latency_args(device, runtime, batch, threads, repeats, warmup)
    x = torch.randn((batch, *(int(s) for s in input_shape)),
                    generator=torch.Generator().manual_seed(0))
    state = [(m, m.training, next(iter(m.parameters()), torch.empty(0)).device) for m in (model, ref)]
    ratios: list[float] = []
    ref_ms: list[float] = []
    try:
        with _torch_threads(threads) as used, torch.inference_mode():
            calls = [_caller(m.eval(), x, device, runtime, threads or used) for m in (model, ref)]
            cuda = calls[0][1]
            time_calls(lambda: (calls[1][0](), calls[0][0]()), repeats=1, warmup=warmup, cuda=cuda)
            for _ in range(repeats):
                b = time_calls(calls[1][0], repeats=1, warmup=0, cuda=cuda)[0]
                a = time_calls(calls[0][0], repeats=1, warmup=0, cuda=cuda)[0]
                ratios.append(a / b)
                ref_ms.append(b)
    finally:
        for m, training, home in state:
            m.to(home).train(training)
    return ratios, ref_ms
