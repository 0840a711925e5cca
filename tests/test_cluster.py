"""A real two-node Ray cluster on 127.0.0.1: trials spread over both nodes, and survive
the loss of one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from search.results.trials_file import read_records

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cluster():
    """A head and a worker node, one CPU each, both on 127.0.0.1 (told apart by node id)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def _search_args(tmp_path: Path, address: str, name: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), "search", "--config", "quickstart",
            "--address", address, "--storage_path", str(tmp_path), "--name", name,
            "--set", "retrain.enabled=false", "--set", f"model.pretrain.cache_dir={cache}",
            *extra]


def _reports(folder: Path) -> dict[str, list[dict]]:
    out = {}
    for f in folder.glob("trial_*/result.json"):
        lines = []
        for line in f.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
        out[f.parent.name[len("trial_"):]] = lines
    return out


def test_trials_spread_over_both_nodes_and_survive_losing_one(cluster, tmp_path,
                                                              search_cache_dir):
    head, worker = cluster.head_node, next(iter(cluster.worker_nodes))
    assert head.node_ip_address == worker.node_ip_address == "127.0.0.1"
    folder = tmp_path / "lost"
    proc = subprocess.Popen(_search_args(tmp_path, cluster.address, "lost", search_cache_dir,
                                         "--num_samples", "8", "--set", "trial.epochs=5",
                                         # small batches: epochs of a second or two, so
                                         # the victim cannot finish its four epochs to go
                                         # before its node (and the worker process it
                                         # leaves behind) is gone
                                         "--set", "trial.batch_size=16",
                                         "--set", "scheduler.name=none"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    try:
        deadline = time.time() + 300
        while victim is None and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            records = read_records(folder / "trials.jsonl", warn=False)
            if any(r["node"] == worker.node_id for r in records):  # one finished there
                ended = {r["trial_id"] for r in records}
                for tid, reps in _reports(folder).items():  # one running there now
                    if tid not in ended and reps and reps[-1].get("node") == worker.node_id \
                            and reps[-1].get("epoch", 0) <= 1:  # four epochs still to go
                        victim = tid
                        break
            time.sleep(0.05)
        assert victim is not None, "no trial ran on the worker node"
        cluster.remove_node(worker, allow_graceful=False)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert f"cluster {cluster.address}" in out
    records = {r["trial_id"]: r for r in read_records(folder / "trials.jsonl")}
    assert len(records) == 8
    assert all(r["status"] == "completed" and r["epochs"] == 5 for r in records.values())
    nodes = Counter(r["node"] for r in records.values())
    assert set(nodes) == {head.node_id, worker.node_id}, nodes  # told apart by node id
    # the trial that lost its node finished on the head, from its last checkpoint
    assert records[victim]["node"] == head.node_id
    reports = _reports(folder)[victim]
    assert any(r.get("node") == worker.node_id for r in reports)
