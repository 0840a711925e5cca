"""The search's rate space for a config and a baseline, priced by the experiment's
latency table when the search uses latency.

A new experiment keeps its latency table as ``latency_table.json`` beside its manifest
(:mod:`search.experiment.latency_source` decides where the table comes from); everything that
prices a vector later (a resumed search, the analysis, the retrain) reads that copy
here. No Ray here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.experiment.config import SearchConfig
from sketch_core.errors import UserError

__all__ = ["LATENCY_FILE", "saved_table", "rate_space"]

LATENCY_FILE = "latency_table.json"


def saved_table(exp_dir: Path | None) -> Any | None:
    """The experiment's copy of its latency table, or None when it has none."""
    if exp_dir is None or not (Path(exp_dir) / LATENCY_FILE).is_file():
        return None
    from sketch_core.cost.latency_table import load_table

    return load_table(Path(exp_dir) / LATENCY_FILE)


def rate_space(config: SearchConfig, baseline: dict, exp_dir: Path | None = None) -> Any:
    """The search's :class:`~search.propose.space.RateSpace`; with ``exp_dir``, priced by the
    experiment's latency table when the search uses latency."""
    from search.propose.space import RateSpace

    m, sp = config.model, config.space
    cfg = m.resolved_arch(baseline.get("input_size"))  # the family the data decides
    table = saved_table(exp_dir) if config.uses_latency else None
    if config.uses_latency and exp_dir is not None and table is None:
        raise UserError(f"{exp_dir} holds no latency table, which its config needs; start "
                        f"the search again in a new folder")
    return RateSpace(latency=table, cfg=cfg, data_set=m.data_set, low=sp.low, high=sp.high, step=sp.step,
                     grouping=sp.grouping, round_to=sp.round_to, start_conv=config.sketch.start_conv,
                     sketch_lastconv=config.sketch.sketch_lastconv,
                     num_classes=baseline["num_classes"], in_channels=baseline["in_channels"],
                     input_size=baseline["input_size"])
