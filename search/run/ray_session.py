"""The one way sketchtune reaches Ray: connect to a cluster or start a local instance.

A local instance binds 127.0.0.1 with usage statistics off; an ``--address`` is
probed first so that a wrong one fails in seconds, not after Ray's long retries. The
workers of a local instance can import sketchtune from a source checkout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator

from sketch_core.errors import UserError

__all__ = ["ray_session", "quiet_ray_env", "check_resources", "import_path_env", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONNECT_TIMEOUT_S = 25.0


def quiet_ray_env() -> None:
    """Before Ray starts: local instance on 127.0.0.1, no usage statistics."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Tune's result.json and progress.csv are added explicitly (see _tune_parts); its
    # TensorBoard logger, which cost time on every report, is not
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # the legacy console output is silent at verbose=0; the progress line is ours
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # one checkpoint kept per trial forces a state snapshot at each report: that is wanted
    # (a fresh snapshot for --resume), the warning about it is not
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _probe(address: str) -> None:
    """Fail fast when nothing listens at host:port (Ray would retry for a long time)."""
    target = address.split("://", 1)[-1]
    if ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        port_no = int(port)
    except ValueError:
        raise UserError(f"--address {address!r}: expected auto, host:port or "
                        f"ray://host:port") from None
    try:
        with socket.create_connection((host, port_no), timeout=5):
            pass
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                        f"start one with `ray start --head` or leave --address out for a local "
                        f"instance") from None


def import_path_env() -> dict[str, str]:
    """Workers must import sketchtune: add the source tree when it is not installed."""
    try:
        spec = importlib.util.find_spec("search")
        installed = spec is not None and "site-packages" in str(spec.origin)
    except Exception:
        installed = False
    if installed:
        return {}
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                log_to_driver: bool = False) -> Iterator[bool]:
    """Connect to ``address`` or start a local instance; yields True if we started it.

    ``log_to_driver`` shows the workers' output here (a data-parallel run's log lines).
    """
    quiet_ray_env()
    import ray  # heavy: ray

    if ray.is_initialized():
        yield False
        return
    env = import_path_env()
    if env:  # local instance: its processes inherit the driver's environment
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    if address:
        _probe(address)
        done = threading.Event()

        def watchdog() -> None:
            if not done.wait(CONNECT_TIMEOUT_S):
                print(f"error: --address {address}: no answer from the Ray cluster within "
                      f"{CONNECT_TIMEOUT_S:.0f} s", file=sys.stderr, flush=True)
                os._exit(2)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                     log_to_driver=log_to_driver, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--address {address}: cannot connect to a Ray cluster "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                            ) from None
        finally:
            done.set()
        try:
            yield False
        finally:
            ray.shutdown()
        return
    # "local": a new instance, never one found on the machine (ray.init() without an
    # address would join the cluster named in /tmp/ray/ray_current_cluster)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             log_to_driver=log_to_driver, logging_level=logging.WARNING, configure_logging=True)
    try:
        yield True
    finally:
        ray.shutdown()


def check_resources(cpu: float, gpu: float) -> None:
    """UserError when no node of the cluster could ever run one trial."""
    import ray  # heavy: ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    max_cpu = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    max_gpu = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
    if cpu > max_cpu or gpu > max_gpu:
        raise UserError(f"a trial asks for {cpu:g} CPU and {gpu:g} GPU (resources.cpu/gpu), but "
                        f"the largest of the cluster's {len(nodes)} node(s) has {max_cpu:g} CPU "
                        f"and {max_gpu:g} GPU; lower the request or add such a node")
