"""``launch.py sketch`` and ``launch.py pretrain``: the original's single-shot command line.

``sketch`` loads ``--sketch_model``, sketches it at ``--sketch_rate``, recalibrates BN
and fine-tunes; ``pretrain`` trains an unpruned baseline that ``sketch`` accepts. Every
argument of the original keeps its name, meaning and default; booleans take the
original's spelling (``--filter_norm True``). This module only turns the parsed
arguments into a :class:`sketch_core.job_spec.RunSpec` (:func:`spec_from_args`) and runs it
on one device with :func:`sketch_core.jobs.execute`, which owns the job folder and
its files. ``search.cli.train_runs`` sends runs on several GPUs to
``search.run.data_parallel`` (Ray Train), whose workers execute the same spec.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from typing import Callable, Iterator

from sketch_core.errors import UserError
from sketch_core.job_checks import check_spec
from sketch_core.job_folder import job_folder, logging_to, select_devices
from sketch_core.job_spec import DataSpec, ModelSpec, OutputSpec, RunSpec, SketchSpec, run_defaults
from sketch_core.jobs import execute
from sketch_core.options import Recipe
from sketch_core.training.hooks import TrainingInterrupted

__all__ = ["add_arguments", "spec_from_args", "check_args", "run", "str2bool"]

log = logging.getLogger("sketchtune")


def str2bool(text: str | bool) -> bool:
    """The original's boolean spelling: ``True``/``False`` (also yes/no, 1/0)."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("true", "yes", "1", "y", "t"):
        return True
    if value in ("false", "no", "0", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _bool_option(parser: argparse.ArgumentParser, name: str, default: bool, help_text: str) -> None:
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default,
                        metavar="True|False", help=f"{help_text} default:{default}")


def add_arguments(parser: argparse.ArgumentParser, command: str = "sketch") -> None:
    """Every option of the original's ``sketch.py`` (same names and defaults), plus a few."""
    pre = command == "pretrain"
    for group in (_run_arguments, _recipe_arguments, _sketch_arguments, _extra_arguments):
        group(parser, pre)
    parser.set_defaults(command_name=command)


def _run_arguments(parser: argparse.ArgumentParser, pre: bool) -> None:
    """Devices, data, folders and the model to start from."""
    a = parser.add_argument
    a("--gpus", type=int, nargs="+", default=None,
      help="Select gpu_id to use; several ids train data-parallel. default:[0] "
           "(the CPU when the machine has no GPU)")
    a("--data_set", default="cifar10",
      help="Select dataset to train: cifar10, imagenet, folder, digits, synthetic. "
           "default:cifar10")
    a("--data_path", default=None,
      help="The directory where the input is stored. default:data/cifar10 for cifar10 "
           "(cifar-10-batches-py/ inside); class folders train/ and val/ for imagenet, folder")
    a("--job_dir", default="./experiments",
      help="The directory where the summaries will be stored. default:./experiments")
    a("--reset", action="store_true", help="Reset the directory? (removes this tool's files there)")
    a("--resume", default=None,
      help="Continue an interrupted run from its checkpoint (JOB_DIR/checkpoint/train_state.pt, "
           "model_last.pt beside it, or the job folder).")
    if not pre:
        a("--refine", default=None,
          help="Path to an already sketched sketchtune checkpoint to be fine tuned.")
    a("--arch", default=None,
      help="Architecture of model. default:" + (
          "vgg" if pre else "the checkpoint's (sketchtune files describe themselves)"))
    a("--cfg", default=None,
      help="Detail architecture of model. default:" + (
          "vgg16" if pre else "the checkpoint's; original and torchvision files need it"))
    a("--test_only", action="store_true",
      help="Test only: evaluate the checkpoint given by --refine, --resume or --sketch_model "
           "and exit." if not pre else "Test only: evaluate --resume's checkpoint and exit.")


def _recipe_arguments(parser: argparse.ArgumentParser, pre: bool) -> None:
    """The training recipe's options."""
    a = parser.add_argument
    a("--num_epochs", type=int, default=None,
      help="The num of epochs to train. default:" + (
          "40 for digits, 30 for synthetic, 200 otherwise" if pre else "150"))
    a("--train_batch_size", type=int, default=128, help="Batch size for training. default:128")
    a("--eval_batch_size", type=int, default=100, help="Batch size for validation. default:100")
    a("--momentum", type=float, default=0.9, help="Momentum for MomentumOptimizer. default:0.9")
    a("--lr", type=float, default=None,
      help="Learning rate for train. default:" + ("0.1" if pre else "1e-2"))
    a("--lr_decay_step", type=int, nargs="+", default=None,
      help="The epochs at which the learning rate is multiplied by 0.1. default:" + (
          "20 30 for digits, 15 25 for synthetic, 100 150 otherwise" if pre else "50 100"))
    a("--weight_decay", type=float, default=5e-4, help="The weight decay of loss. default:5e-4")


def _sketch_arguments(parser: argparse.ArgumentParser, pre: bool) -> None:
    """How the sketch prunes (``sketch`` only)."""
    a = parser.add_argument
    if pre:
        return
    a("--start_conv", type=int, default=1,
      help="The index of Conv to start sketch (VGG only). default:1")
    a("--sketch_rate", default=None,
      help="The rate of each sketch unit, e.g. '[0.5]*9+[0.6]*9+[0.4]*9' (quote it). "
           "default:None")
    a("--sketch_model", default=None, help="Path to the model wait for sketch. default:None")
    _bool_option(parser, "--sketch_bn", False, "Whether the BN weights are sketched or not?")
    a("--weight_norm_method", default=None,
      help="Select the weight norm method. default:None Optional:max,sum,l2,l1,l2_2,2max")
    _bool_option(parser, "--filter_norm", False, "Filter level normalization or not?")
    _bool_option(parser, "--sketch_lastconv", True, "Is the last layer of convolution sketched?")
    a("--random_rule", default="default",
      help="default sketches; random_pretrain / l1_pretrain keep random / largest-L1 "
           "pretrained filters instead. default:default")
    a("--sketch_mode", default="sketch",
      help="sketch (the paper's method, textbook Frequent Directions: filters replaced by "
           "their sketch), sketch_released (sketch with the released code's FD arithmetic), "
           "select (keep the filters with most energy in the sketch's row space) or "
           "select_lsq (select, then refit consumers by least squares). default:sketch")
    a("--select_by", default="filters",
      help="What select / select_lsq sketch to rank channels: filters (the producer's "
           "filters) or channels (each channel's weights in its consumers, scaled by the "
           "BN gain it arrives with). default:filters")
    a("--calibration_batches", type=int, default=10,
      help="Training batches used to recompute BN statistics (and for select_lsq). "
           "default:10")


def _extra_arguments(parser: argparse.ArgumentParser, pre: bool) -> None:
    """Options the original does not have."""
    a = parser.add_argument
    a("--val_fraction", type=float, default=0.1,
      help="Fraction of the training set held out (seeded) to choose the best epoch. default:0.1")
    a("--seed", type=int, default=0, help="Seed of the split, the shuffling and the init. default:0")
    a("--label_smoothing", type=float, default=0.0, help="Label smoothing. default:0")
    a("--compile", nargs="?", const=True, default=False, metavar="MODE",
      help="torch.compile the model; MODE reduce-overhead adds CUDA graphs (see "
           "docs/benchmarks.md for what it gains)")
    a("--amp", type=str2bool, nargs="?", const=True, default=None, metavar="True|False",
      help="bf16 autocast. default: True on CUDA, False on the CPU")
    a("--download", action="store_true", help="Download CIFAR-10 into --data_path if missing.")
    a("--input_size", type=int, default=None,
      help="Image side for folder, imagenet and synthetic data. default:224 (32 synthetic)")
    a("--num_classes", type=int, default=None,
      help="Number of classes of synthetic data (checked against the data otherwise).")
    a("--num_workers", type=int, default=None,
      help="Decoding processes for class-folder data. default:min(8, CPUs)")
    a("--no_progress", action="store_true", help="No per-batch progress bar.")
    a("--family", default=None,
      help="Model family: cifar or imagenet. default: the only family that has --cfg; for a "
           "cfg in both (resnet50, googlenet), the data set's (folder: cifar when the input "
           "size is at most 64)")
    a("--normalize", default=None, metavar="cifar|imagenet|MEAN/STD",
      help="Input normalisation on [0, 1] pixels: a preset or MEAN/STD with one value per "
           "channel, e.g. 0.5,0.5,0.5/0.25,0.25,0.25. default: the checkpoint's record, else "
           "the data set's own")
    a("--force_normalize", action="store_true",
      help="Use --normalize even where it contradicts the checkpoint's recorded normalisation.")
    if pre:
        a("--init", default=None,
          help="Start from this checkpoint of the unpruned network (a public or original-project "
               "file with --cfg, a torchvision or sketchtune file) instead of a fresh "
               "initialisation. default:None")


# ---------------------------------------------------------------- arguments -> spec


def _resolve_defaults(args: argparse.Namespace) -> None:
    for key, value in run_defaults(args.command_name, args.data_set).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in (("refine", None), ("sketch_model", None), ("sketch_rate", None),
                       ("start_conv", None), ("sketch_mode", None), ("select_by", None)):
        if not hasattr(args, key):
            setattr(args, key, value)


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The run a parsed ``sketch`` / ``pretrain`` command line describes (defaults unresolved
    where the option was left out; :func:`sketch_core.jobs.resolve` fills them)."""
    command = getattr(args, "command_name", None) or "sketch"
    get = lambda key, default=None: getattr(args, key, default)  # noqa: E731
    sketch = None
    if command == "sketch":
        sketch = SketchSpec(
            rates=get("sketch_rate"), mode=get("sketch_mode") or "sketch",
            select_by=get("select_by") or "filters", weight_norm_method=get("weight_norm_method"),
            filter_norm=bool(get("filter_norm", False)), sketch_bn=bool(get("sketch_bn", False)),
            sketch_lastconv=bool(get("sketch_lastconv", True)),
            start_conv=1 if get("start_conv") is None else get("start_conv"),
            random_rule=get("random_rule") or "default",
            calibration_batches=get("calibration_batches", 10))
    steps = get("lr_decay_step")
    return RunSpec(
        command=command,
        data=DataSpec(data_set=args.data_set, data_path=args.data_path,
                      eval_batch_size=args.eval_batch_size, val_fraction=args.val_fraction,
                      seed=args.seed, input_size=args.input_size, num_classes=args.num_classes,
                      num_workers=args.num_workers, download=bool(args.download)),
        model=ModelSpec(arch=args.arch, cfg=args.cfg, sketch_model=get("sketch_model"),
                        refine=get("refine"), init=get("init"), family=get("family"),
                        normalize=get("normalize"),
                        force_normalize=bool(get("force_normalize", False))),
        sketch=sketch,
        train=Recipe(epochs=args.num_epochs, lr=args.lr,
                     lr_decay_step=None if steps is None else tuple(steps),
                     momentum=args.momentum, weight_decay=args.weight_decay,
                     label_smoothing=args.label_smoothing, batch_size=args.train_batch_size,
                     seed=args.seed, amp=args.amp, compile=args.compile),
        output=OutputSpec(job_dir=args.job_dir, reset=bool(args.reset),
                          progress=not args.no_progress),
        test_only=bool(args.test_only), resume=args.resume,
        gpus=None if args.gpus is None else list(args.gpus))


def check_args(args: argparse.Namespace) -> RunSpec:
    """Fill in the command's defaults (on ``args`` too, for the log) and check the run
    before anything is loaded or written; returns its resolved spec."""
    _resolve_defaults(args)
    return check_spec(spec_from_args(args))


# ---------------------------------------------------------------- running


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[Callable[[], int]]:
    """SIGINT/SIGTERM set a flag that the loop polls; yields a getter of the signal number."""
    caught = {"signum": 0}
    if not enabled:
        yield lambda: 0
        return

    def handler(signum, frame):  # noqa: ARG001
        if caught["signum"]:  # a second signal: stop now
            raise KeyboardInterrupt
        caught["signum"] = signum
        print(f"\nsignal {signum} received: saving a resumable checkpoint after this batch",
              file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: caught["signum"]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _command_line(args: argparse.Namespace) -> str:
    """The resolved options, as a command line (for the log)."""
    parts = []
    for key, value in vars(args).items():
        if key in ("command", "command_name") or value is None or value is False:
            continue
        if value is True:
            parts.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"--{key} " + " ".join(map(str, value)))
        else:
            parts.append(f"--{key} {value}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """``launch.py sketch|pretrain`` on one device (several GPUs: see ``search.cli.train_runs``)."""
    spec = check_args(args)
    devices = select_devices(spec.gpus)
    if len(devices) > 1:
        raise UserError("several --gpus run through Ray Train: use launch.py, which sends "
                        "them to search.run.data_parallel")
    if spec.test_only:
        execute(spec, devices[0])
        return 0
    with job_folder(spec) as job, logging_to(job), _stop_on_signals(True) as caught:
        log.info("launch.py %s %s", args.command_name, _command_line(args))
        try:
            execute(spec, devices[0], stop=caught, prepared=True)
        except TrainingInterrupted as exc:
            log.info("%s; continue with --resume %s", exc, exc.state_path)
            return 128 + caught()
    return 0
