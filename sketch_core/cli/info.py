"""``launch.py info``: what a rate vector costs (unit count, FLOPs as MACs, params,
measured latency, and the latency table's prediction: measured and saved, or loaded)."""

from __future__ import annotations

import argparse
import json

from sketch_core.io.checkpoint import load_checkpoint
from sketch_core.errors import UserError
from sketch_core.cost.flops import count_arch, count_flops, input_shape
from sketch_core.rates import parse_rates, rates_to_widths
from sketch_core.registry import list_arches, resolve_arch
from sketch_core.cost.latency_table import build_table, load_table, table_key
from sketch_core.cost.latency import DEVICES, RUNTIMES, check_latency_args, measure_latency

__all__ = ["add_arguments", "info", "latency_model_report", "latency_report", "run"]


def add_arguments(p: argparse.ArgumentParser, command: str = "info") -> None:
    p.add_argument("--arch", default=None, help=f"model family member: {', '.join(list_arches())}")
    p.add_argument("--cfg", default=None, help="architecture, e.g. resnet56, vgg16, resnet50")
    p.add_argument("--data_set", default="cifar10",
                   help="for a cfg both families have (resnet50, googlenet): imagenet, or folder "
                        "unless --input_size <= 64, -> ImageNet models; others -> CIFAR")
    p.add_argument("--family", default=None,
                   help="cifar or imagenet: the model family, explicitly (default: the only "
                        "family that has --cfg, else the data set's)")
    p.add_argument("--sketch_rate", default=None, help="rate vector, e.g. '[0.6]*27'")
    p.add_argument("--sketch_model", default=None, help="a checkpoint to describe (loaded strictly)")
    p.add_argument("--start_conv", type=int, default=None, help="VGG only: first conv with a rate")
    p.add_argument("--sketch_lastconv", default="True", help="sketch the last unit (True/False)")
    p.add_argument("--num_classes", type=int, default=None)
    p.add_argument("--in_channels", type=int, default=3)
    p.add_argument("--input_size", type=int, default=None, help="input height/width (default: 32 or 224)")
    p.add_argument("--round_to", type=int, default=1, help="round kept widths up to a multiple")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_latency_arguments(p)


# --- measured latency (info --latency) ---------------------------------------------

def _add_latency_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measured latency")
    g.add_argument("--latency", action="store_true",
                   help="also measure the latency of the unpruned and the sketched model")
    g.add_argument("--latency_device", default="cpu", help="cpu (default) or cuda")
    g.add_argument("--latency_batch", type=int, default=1, help="batch size to time (default 1)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads to time with (default: torch's current count, printed)")
    g.add_argument("--runtime", default="torch", help="torch (eager, default) or onnxruntime")
    g.add_argument("--latency_repeats", type=int, default=30,
                   help="timed calls after the warm-up (default 30)")
    g.add_argument("--save_table", default=None, metavar="FILE",
                   help="measure the per-layer latency table on this machine (with the settings "
                        "above) and save it as JSON (implies --latency)")
    g.add_argument("--latency_table", default=None, metavar="FILE",
                   help="predict the latency from a saved table; it must match --latency_device, "
                        "--runtime, the model, --latency_batch, --threads (if given) and torch")
    g.add_argument("--table_points", type=int, default=5,
                   help="grid points per width axis when measuring a table (default 5; a module "
                        "with only one width that varies gets 2N-1)")


def latency_report(res: dict, *, device: str = "cpu", batch: int = 1, threads: int | None = None,
                   runtime: str = "torch", repeats: int = 30, warmup: int = 5,
                   num_classes: int | None = None) -> dict:
    """Measured latency of the unpruned and the sketched model ``res`` (an :func:`info`
    result) describes, both built fresh at their widths (weights do not change the time)."""
    check_latency_args(device, runtime, batch, threads, repeats, warmup)
    entry = resolve_arch(res["cfg"], family=res["family"], input_size=res["input"][-1])
    ncls, inch = num_classes, res["input"][0]
    shape = tuple(res["input"])
    kw = dict(device=device, batch=batch, threads=threads, runtime=runtime, repeats=repeats,
              warmup=warmup)
    out = {"unpruned": measure_latency(entry.build(None, ncls, inch), shape, **kw).as_dict()}
    if res["widths"] is not None:
        out["sketched"] = measure_latency(entry.build(res["widths"], ncls, inch), shape, **kw).as_dict()
        out["speedup"] = out["unpruned"]["median_ms"] / out["sketched"]["median_ms"]
    return out


def _table_arch(res: dict):
    entry = resolve_arch(res["cfg"], family=res["family"], input_size=res["input"][-1])
    return entry.with_start_conv(res.get("start_conv"))


def latency_model_report(res: dict, *, load: str | None = None, save: str | None = None,
                         device: str = "cpu", batch: int = 1, threads: int | None = None,
                         runtime: str = "torch", num_classes: int | None = None,
                         points: int = 5) -> dict:
    """The latency table's prediction for the unpruned and the sketched model: from the
    table saved at ``load`` (checked against this target), or measured here and saved
    at ``save``."""
    arch = _table_arch(res)
    if device not in DEVICES or runtime not in RUNTIMES:
        raise UserError(f"--latency_device {device!r} / --runtime {runtime!r}: expected one of "
                        f"{', '.join(DEVICES)} / {', '.join(RUNTIMES)}")
    if points < 2:
        raise UserError(f"--table_points must be at least 2, got {points}")
    if load is not None:
        want = table_key(arch, device=device, runtime=runtime, batch=batch, threads=threads,
                         num_classes=num_classes, in_channels=res["input"][0])
        want["threads"] = threads  # None: any thread count
        table = load_table(load, want)
    else:
        table = build_table(arch, device=device, runtime=runtime, batch=batch, threads=threads,
                            num_classes=num_classes, in_channels=res["input"][0], points=points)
        table.save(save)
    out = {"table": load or save, "saved": load is None, "key": table.key,
           "stat": table.settings.get("stat"), "unpruned_ms": table.predict(None)}
    if res["widths"] is not None:
        out["sketched_ms"] = table.predict(res["widths"])
        out["speedup"] = out["unpruned_ms"] / out["sketched_ms"]
    return out


def _print_latency_model(m: dict) -> None:
    k = m["key"]
    threads = f", {k['threads']} thread(s)" if k["threads"] is not None else ""
    stat = {"min": "fastest-call", "median": "median"}.get(m.get("stat"), "")
    print(f"{stat} latency predicted by the table {m['table']}"
          f"{' (measured here, saved)' if m['saved'] else ''} ({k['runtime']} on {k['device']}"
          f"{threads}, batch {k['batch']})")
    print(f"{'unpruned':10}{m['unpruned_ms']:>10.3f} ms")
    if "sketched_ms" in m:
        print(f"{'sketched':10}{m['sketched_ms']:>10.3f} ms")
        print(f"{'speed-up':10}{m['speedup']:>10.2f}x")


def _print_latency(lat: dict) -> None:
    u = lat["unpruned"]
    threads = f", {u['threads']} thread(s)" if u["threads"] is not None else ""
    print(f"latency ({u['runtime']} on {u['device']}{threads}, batch {u['batch']}; median "
          f"[p10-p90] of {u['repeats']} calls after {u['warmup']} warm-up)")
    for name in ("unpruned", "sketched"):
        if name in lat:
            s = lat[name]
            print(f"{name:10}{s['median_ms']:>10.3f} ms  [{s['p10_ms']:.3f}-{s['p90_ms']:.3f}]")
    if "speedup" in lat:
        print(f"{'speed-up':10}{lat['speedup']:>10.2f}x")

# ------------------------------------------------------------------------------------


def _bool(text: str, name: str) -> bool:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise UserError(f"{name} takes True or False, got {text!r}")


def info(cfg: str | None, data_set: str = "cifar10", sketch_rate: str | None = None,
         sketch_model: str | None = None, arch: str | None = None, start_conv: int | None = None,
         sketch_lastconv: bool = True, num_classes: int | None = None, in_channels: int = 3,
         input_size: int | None = None, round_to: int = 1, family: str | None = None) -> dict:
    """What ``launch.py info`` prints, as a dict; ``family`` (cifar/imagenet) overrides the
    data set's choice of model family."""
    arches = list_arches()
    if arch is not None and arch not in arches:
        raise UserError(f"unknown --arch {arch!r}; valid: {', '.join(arches)}")
    out: dict = {}
    loaded = None
    if sketch_model:
        asked = resolve_arch(cfg, data_set, family=family, input_size=input_size) \
            if cfg is not None else None
        loaded = load_checkpoint(sketch_model, asked, data_set, num_classes=num_classes)
        if family is not None and family != loaded.meta["family"]:
            raise UserError(f"--family {family}: {sketch_model} holds a {loaded.meta['family']}-"
                            f"family {loaded.meta['cfg']}")
        cfg = loaded.meta["cfg"]
        family = loaded.meta["family"]
        num_classes, in_channels = loaded.meta["num_classes"], loaded.meta["in_channels"]
        out["checkpoint"] = {"path": sketch_model, "loaded": "strict", "format": loaded.meta["format"],
                             "pruned": loaded.meta["pruned"],
                             "messages": list(loaded.meta.get("messages") or [])}
    if cfg is None:
        raise UserError("--cfg is required (e.g. --cfg resnet56), or give --sketch_model")
    entry = resolve_arch(cfg, data_set, family=family, arch=arch, start_conv=start_conv,
                         input_size=input_size)
    size = entry.input_size
    base_flops, base_params = count_arch(entry, None, None, num_classes, in_channels)
    out.update({"cfg": cfg, "arch": entry.arch, "family": entry.family,
                "start_conv": entry.start_conv, "num_rates": entry.num_units,
                "input": list(input_shape(entry.family, in_channels, size)),
                "base_flops": base_flops, "base_params": base_params, "flops_unit": "MACs"})
    rates = widths = None
    if sketch_rate is not None:
        rates = parse_rates(sketch_rate, entry)
        widths = rates_to_widths(entry, rates, sketch_lastconv=sketch_lastconv, round_to=round_to)
        flops, params = count_arch(entry, None, widths, num_classes, in_channels)
    elif loaded is not None:
        rates, widths = loaded.meta.get("rates"), loaded.meta["widths"]
        flops, params = count_flops(loaded.model, input_shape(entry.family, in_channels, size))
    else:
        flops, params = base_flops, base_params
    out.update({"rates": rates, "widths": widths, "flops": flops, "params": params,
                "flops_ratio": flops / base_flops, "params_ratio": params / base_params,
                "flops_reduction_pct": 100 * (1 - flops / base_flops),
                "params_reduction_pct": 100 * (1 - params / base_params)})
    return out


def _human(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(int(x))


def run(args: argparse.Namespace) -> int:
    res = info(args.cfg, args.data_set, args.sketch_rate, args.sketch_model, args.arch, args.start_conv,
               _bool(args.sketch_lastconv, "--sketch_lastconv"), args.num_classes, args.in_channels,
               args.input_size, args.round_to, args.family)
    lat = dict(device=args.latency_device, batch=args.latency_batch, threads=args.threads,
               runtime=args.runtime, num_classes=args.num_classes)
    if args.save_table and args.latency_table:
        raise UserError("--save_table measures a new table and --latency_table loads one; give one")
    if args.save_table and args.table_points < 2:
        raise UserError(f"--table_points must be at least 2, got {args.table_points}")
    if args.latency_table:
        res["latency_model"] = latency_model_report(res, load=args.latency_table, **lat)
    if args.latency or args.save_table:
        res["latency"] = latency_report(res, repeats=args.latency_repeats, **lat)
    if args.save_table:
        res["latency_model"] = latency_model_report(res, save=args.save_table,
                                                    points=args.table_points, **lat)
    if args.json:
        print(json.dumps(res))
        return 0
    if "checkpoint" in res:
        c = res["checkpoint"]
        print(f"loaded {c['path']} ({c['format']}, strict){' - pruned' if c['pruned'] else ''}")
        for line in c.get("messages") or ():
            print(f"  {line}")
    print(f"{res['family']} {res['cfg']}: {res['num_rates']} sketch rates, input "
          f"{'x'.join(map(str, res['input']))}")
    print(f"{'':10}{'FLOPs (MACs)':>14}{'params':>12}")
    print(f"{'unpruned':10}{_human(res['base_flops']):>14}{_human(res['base_params']):>12}")
    if res["rates"] is not None:
        print(f"{'sketched':10}{_human(res['flops']):>14}{_human(res['params']):>12}")
        print(f"{'reduction':10}{res['flops_reduction_pct']:>13.2f}%{res['params_reduction_pct']:>11.2f}%")
    if "latency" in res:
        _print_latency(res["latency"])
    if "latency_model" in res:
        _print_latency_model(res["latency_model"])
    return 0
