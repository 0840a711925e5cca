"""The training step as one captured CUDA graph: forward, backward and the SGD update.

A CIFAR ResNet at batch 128 launch-bounds a GPU: the eager step spends its time
issuing hundreds of small kernels. :class:`GraphStep` captures the whole step once
for the run's fixed batch shape and replays it for every batch of that shape:

- the first ``warmup`` batches (3) train eagerly on a side stream, so cuDNN has
  chosen its algorithms, autocast and autograd are set up and the optimizer's
  momentum buffers exist before the capture;
- the next batch is trained twice from the same state: eagerly (``torch.optim.SGD``)
  and by the captured graph; their loss, logits and every updated tensor (weights, BN
  statistics, momentum buffers) must agree within a tolerance measured against the
  step's own change. A capture that fails or disagrees is dropped with one log line,
  the eager result is kept, and the run continues eagerly;
- the update inside the graph is :func:`sgd_update_`, SGD with momentum and weight
  decay as in-place foreach ops, the learning rate a device tensor refreshed from the
  optimizer's ``param_groups`` before each replay, so the schedule keeps working and
  the optimizer's state (its momentum buffers, updated in place) saves and resumes as
  before;
- a batch of any other shape (the last, partial batch of an epoch) runs eagerly.

Inputs are copied into static tensors (data is resident on the device, so that is one
copy kernel per batch); gradients live in the graph's memory pool. Data parallelism
and ``torch.compile`` do not combine with it (:func:`graph_unavailable` says why).
The capture mechanism is a parameter (:class:`CudaGraphCapture` by default), so the
warm-up, the check and the fallback are tested on the CPU with a stand-in that
replays by running the step again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["GraphStep", "CudaGraphCapture", "sgd_update_", "graph_unavailable",
           "state_tensors"]

log = logging.getLogger("sketchtune")

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def graph_unavailable(device: torch.device, *, distributed: bool = False,
                      compiled: bool | str = False) -> str | None:
    """Why the graph step cannot run here (None when it can)."""
    if device.type != "cuda":
        return f"it needs a CUDA device and this run is on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if distributed:
        return "it does not combine with data parallelism"
    if compiled:
        return "it does not combine with torch.compile (whose reduce-overhead mode graphs too)"
    return None


@torch.no_grad()
def sgd_update_(params: list[torch.Tensor], grads: list[torch.Tensor],
                bufs: list[torch.Tensor | None], neg_lr: torch.Tensor, *, momentum: float,
                weight_decay: float) -> None:
    """``torch.optim.SGD``'s step (no dampening, no Nesterov) in place, the rate a tensor.

    ``d = grad + weight_decay * p``; with momentum ``buf = momentum * buf + d`` and
    ``d = buf``; then ``p += neg_lr * d``. ``neg_lr`` is minus the learning rate, a
    0-dim tensor on the parameters' device, so a captured update follows a schedule.
    The momentum buffers must exist (the optimizer's, after one eager step).
    """
    if not params:
        return
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else list(grads)
    if momentum:
        if any(b is None for b in bufs):
            raise RuntimeError("momentum buffers are missing: take one eager step first")
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d)
        d = bufs
    torch._foreach_add_(params, torch._foreach_mul(d, neg_lr))


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor one training step changes: parameters, buffers, momentum buffers."""
    out = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out.append(buf)
    return out


class CudaGraphCapture:
    """``capture(fn)`` records ``fn()`` into a ``torch.cuda.CUDAGraph``; ``replay()`` reruns it.

    Both return the tensors ``fn`` returned at capture (static: every replay rewrites them).
    """

    def __init__(self) -> None:
        self.graph: Any = None
        self.outputs: Any = None

    def capture(self, fn: Callable[[], Any]) -> Any:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()
        return self.outputs

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs

    def close(self) -> None:
        self.graph = self.outputs = None


def _side_stream(device: torch.device):
    """A side stream that waits for the current one (CUDA), or nothing (elsewhere)."""
    if device.type != "cuda":
        return contextlib.nullcontext(), (lambda: None)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    return torch.cuda.stream(side), (lambda: torch.cuda.current_stream(device).wait_stream(side))


def _norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(t.double()) for t in tensors])))


class GraphStep:
    """A training step ``step(x, y) -> (logits, loss)`` that replays a captured graph.

    ``eager`` is the run's own eager step (forward, loss, ``zero_grad``, backward,
    ``optimizer.step()``): it trains the warm-up batches, the reference batch of the
    check and every batch of another shape. ``batch_size`` (e.g. the loader's) is the
    size captured; None: the first batch's. ``tolerance`` bounds the graph's distance
    from the eager step, as a fraction of the step's own change of the state.
    ``capture`` makes the capturer (:class:`CudaGraphCapture`). After a fallback,
    ``fallback`` holds the reason and every step is eager.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 eager: StepFn, device: torch.device, *, amp: bool, batch_size: int | None = None,
                 warmup: int = 3, tolerance: float = 0.05,
                 capture: Callable[[], Any] = CudaGraphCapture) -> None:
        if len(optimizer.param_groups) != 1:
            raise ValueError("the graph step handles one parameter group")
        self.model, self.optimizer, self.criterion, self.eager = model, optimizer, criterion, eager
        self.device, self.amp, self.batch_size = device, amp, batch_size
        self.warmup, self.tolerance, self.make_capturer = max(1, warmup), tolerance, capture
        self.warm = 0
        self.capturer: Any = None
        self.fallback: str | None = None
        self.capture_s: float | None = None
        self.replays = 0
        self.shape: tuple | None = None
        self._lr: float | None = None

    # ------------------------------------------------------------------ the step

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fallback is not None or not self._fits(x, y):
            return self.eager(x, y)
        if self.capturer is not None:
            return self._replay(x, y)
        if self.warm < self.warmup:
            self.warm += 1
            context, join = _side_stream(self.device)
            with context:
                out = self.eager(x, y)
            join()
            return out
        return self._capture_and_check(x, y)

    def _fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        if self.shape is None:
            if self.batch_size is not None and len(x) != self.batch_size:
                return False
            self.shape = (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype)
        return (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype) == self.shape

    def _replay(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        lr = float(self.optimizer.param_groups[0]["lr"])
        if lr != self._lr:
            self.neg_lr.fill_(-lr)
            self._lr = lr
        self.replays += 1
        return self.capturer.replay()

    # ------------------------------------------------------------------ capture and check

    def _work(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the graph holds: the step on the static batch, with the foreach update."""
        group = self.optimizer.param_groups[0]
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=False):
            out = self.model(self.static_x)
            loss = self.criterion(out, self.static_y)
        loss.backward()
        live = [p for p in group["params"] if p.grad is not None]
        bufs = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in live]
        sgd_update_(live, [p.grad for p in live], bufs, self.neg_lr,
                    momentum=group["momentum"], weight_decay=group["weight_decay"])
        return out, loss

    def _capture_and_check(self, x: torch.Tensor, y: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = state_tensors(self.model, self.optimizer)
        before = [t.detach().clone() for t in tensors]
        ref_out, ref_loss = self.eager(x, y)
        ref_out, ref_loss = ref_out.detach().float().clone(), ref_loss.detach().float().clone()
        after = [t.detach().clone() for t in tensors]
        _copy_into(tensors, before)
        t0 = time.perf_counter()
        try:
            group = self.optimizer.param_groups[0]
            if group.get("nesterov") or group.get("dampening") or group.get("maximize"):
                raise ValueError("only plain SGD with momentum and weight decay is graphed")
            self.static_x, self.static_y = x.detach().clone(), y.detach().clone()
            self._lr = float(group["lr"])
            self.neg_lr = torch.full((), -self._lr, device=x.device, dtype=torch.float32)
            self.capturer = self.make_capturer()
            self.capturer.capture(self._work)
            self.capture_s = time.perf_counter() - t0
            out, loss = self._replay(x, y)
            problem = self._disagreement(tensors, before, after, ref_out, ref_loss, out, loss)
        except Exception as exc:  # noqa: BLE001 - any failure of the capture means eager
            problem = f"the capture failed ({type(exc).__name__}: {str(exc).splitlines()[0]})" \
                if str(exc) else f"the capture failed ({type(exc).__name__})"
        if problem is not None:
            self.close()
            _copy_into(tensors, after)
            self.fallback = problem
            log.warning("graph step: %s; running eager steps", problem)
            return ref_out, ref_loss
        log.info("graph step: captured for batches of %d in %.2f s, checked against the "
                 "eager step", len(x), self.capture_s)
        return out, loss

    def _disagreement(self, tensors: list[torch.Tensor], before: list[torch.Tensor],
                      after: list[torch.Tensor], ref_out: torch.Tensor, ref_loss: torch.Tensor,
                      out: torch.Tensor, loss: torch.Tensor) -> str | None:
        """Why the graph's step is not the eager one (None when they agree)."""
        tol = self.tolerance
        got, want = float(loss.detach().float()), float(ref_loss)
        if not abs(got - want) <= tol * 0.1 * abs(want) + 1e-4:
            return f"it disagrees with the eager step (loss {got:.6g}, eager {want:.6g})"
        out = out.detach().float()
        if not float((out - ref_out).abs().max()) <= tol * float(ref_out.abs().max()) + 1e-3:
            return "it disagrees with the eager step (the logits differ)"
        floats = [i for i, t in enumerate(tensors) if t.is_floating_point()]
        for i, t in enumerate(tensors):
            if i not in floats and not torch.equal(t, after[i]):
                return "it disagrees with the eager step (a counter differs)"
        change = _norm([after[i] - before[i] for i in floats])
        diff = _norm([tensors[i].detach() - after[i] for i in floats])
        scale = _norm([after[i] for i in floats])
        if not diff <= tol * change + 1e-6 * scale:
            share = diff / change if change else float("inf")
            return (f"it disagrees with the eager step (the updated state is off by "
                    f"{100 * share:.1f}% of the step's change)")
        return None

    def close(self) -> None:
        """Release the graph and its static tensors."""
        if self.capturer is not None and hasattr(self.capturer, "close"):
            self.capturer.close()
        self.capturer = None
        self.static_x = self.static_y = None


@torch.no_grad()
def _copy_into(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for t, v in zip(tensors, values):
        t.copy_(v)
