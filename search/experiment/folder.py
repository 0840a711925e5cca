"""The experiment folder's location and its manifest (manifest.json).

Everything about one search lives under ``<storage_path>/<name>/``; the manifest
records the command, the resolved config, seeds, versions, git commit, baseline and
phase times, so that ``analyze``, ``retrain`` and ``--resume`` need nothing else.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from search.experiment.config import StorageConfig
from sketch_core.io.atomic import atomic_write_json
from sketch_core.errors import UserError

__all__ = ["is_uri", "experiment_location", "read_manifest", "write_manifest", "git_commit", "versions"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def is_uri(path: str) -> bool:
    return "://" in path


def experiment_location(storage_config: StorageConfig, source: str | None = None,
                        resume: bool = False) -> tuple[Path, str, str]:
    """(local experiment folder, Ray storage_path, name) of a config's ``storage`` section
    (``source``: the config file, whose name a new experiment's name starts with)."""
    storage = storage_config.storage_path
    name = storage_config.name
    if not name:
        if resume:
            raise UserError("--resume needs --name (the experiment to continue) "
                            "and the --storage_path it was written to")
        stem = Path(source or "search").stem
        name = f"{stem}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if is_uri(storage):
        local = Path("experiments").resolve() / name  # our files; Ray's go to the URI
        return local, storage, name
    root = Path(storage).expanduser().resolve()
    return root / name, str(root), name


def read_manifest(exp_dir: str | os.PathLike) -> dict:
    path = Path(exp_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{exp_dir} holds no experiment (no manifest.json); expected the folder "
                        f"a `launch.py search` wrote") from None
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None


def write_manifest(exp_dir: Path, manifest: dict) -> None:
    atomic_write_json(exp_dir / "manifest.json", manifest)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def versions() -> dict[str, str]:
    import optuna  # heavy: optuna, torch, ray; only when a manifest is written

    try:  # a search without Ray (search.run.local_loop) runs where Ray is not installed
        import ray  # heavy: ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "ray": ray_version, "optuna": optuna.__version__, "sketchtune": "0.1.0"}
