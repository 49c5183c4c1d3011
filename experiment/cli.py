"""What every command line of experiment/ shares: the common flags, flags mapped to config keys
(typed once, by argparse), and the frame that loads the config, starts the process group, sets
up logging and turns errors into one message and a non-zero exit on every rank (so a torchrun
job fails fast instead of hanging)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from experiment.config import DATASETS
from experiment.errors import StopRequested, is_user_error, one_line
from experiment.runtime import keep_freed_memory, set_threads_for_cpu
from utils import dist
from utils.config import ConfigError, add_config_arguments
from utils.io import find_in_chain

log = logging.getLogger("experiment")

# flag -> config key, for the flags every script has
SHARED_FLAGS = {"output_dir": "output_dir", "dataset_dir": "data.dataset_dir", "dataset": "data.dataset",
                "class_table": "data.class_table", "device": "train.device"}
# test-time inference flags shared by validation and infer (experiment/tta.py)
INFERENCE_FLAGS = {"scales": "model.eval_scales", "sliding_window": "val.sliding_window",
                   "window_size": "val.window_size", "window_stride": "val.window_stride", "flip": "val.flip"}
AMP_CHOICES = ("auto", "on", "off", "bf16", "fp16")


def str2bool(text: str) -> bool:
    """argparse type for the reference's ``--has_edge True`` style flags."""
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "on", "t", "y"):
        return True
    if lowered in ("false", "0", "no", "off", "f", "n", "none"):
        return False
    raise ValueError(f"expected a boolean (True/False), got {text!r}")


def float_list(text: str) -> List[float]:
    """argparse type: ``0.5,1.0,2.0`` -> [0.5, 1.0, 2.0]."""
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def size_pair(text: str) -> Tuple[int, int]:
    """argparse type: ``H,W`` or one number for a square."""
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected H,W or one number, got {text!r}")
    return (values[0], values[-1])


def script_parser(doc: str, output_help: str, opt_example: str = "optim.lr=0.01 train.amp=false",
                  config_required: bool = False) -> argparse.ArgumentParser:
    """The arguments every experiment script shares: --config/--opt, --output_dir (or --output-dir),
    --dataset_dir (or --dataset-dir), --dataset, --class_table, --device, and torch.distributed.launch's --local_rank
    (accepted, unused: torchrun's LOCAL_RANK variable is read instead).  ``opt_example``: real keys
    of the script's config for --opt's help.  Required flags go in ``parser.required_arguments``,
    listed under their own heading by --help."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.required_arguments = parser.add_argument_group("required arguments")  # type: ignore[attr-defined]
    add_config_arguments(parser, opt_example=opt_example, required=config_required,
                         group=parser.required_arguments if config_required else None,  # type: ignore[attr-defined]
                         config_help="YAML config file, or the name of a shipped one (e.g. synthetic); repeat "
                                     "to merge several (later ones win).  Its relative paths resolve against "
                                     "its project, not the current directory")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", help=output_help)
    parser.add_argument("--dataset_dir", "--dataset-dir", dest="dataset_dir",
                        help="the dataset's root (default: $CITYSCAPES_DATASET for cityscapes, else the synthetic "
                             "dataset)")
    parser.add_argument("--dataset", choices=DATASETS,
                        help="what reads --dataset_dir: cityscapes (default), folder (images/ + labels/ or a list "
                             "of pairs, with a class table; docs/datasets.md) or nyu (NYU-Depth-v2, 40 classes)")
    parser.add_argument("--class_table", "--class-table", dest="class_table",
                        help="folder datasets: the class table YAML (default <root>/classes.yaml)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: CUDA when available")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """--scales, --sliding_window/--window_size/--window_stride and --flip (experiment/tta.py)."""
    parser.add_argument("--scales", type=float_list,
                        help="HMS: its attention scales, e.g. 0.25,0.5,1.0,2.0; other archs: scales whose logits "
                             "are averaged, e.g. 0.75,1.0,1.25 (model.eval_scales)")
    parser.add_argument("--sliding_window", type=str2bool, nargs="?", const=True, default=None,
                        help="average the logits of overlapping --window_size crops (val.sliding_window)")
    parser.add_argument("--window_size", type=size_pair, help="sliding-window crop H,W (default 1024,1024)")
    parser.add_argument("--window_stride", type=size_pair, help="sliding-window stride H,W (default 768,768)")
    parser.add_argument("--flip", type=str2bool, nargs="?", const=True, default=None,
                        help="average with the horizontally flipped image's prediction (val.flip)")


def flag_overrides(args: argparse.Namespace, mapping: Dict[str, str]) -> List[Any]:
    """``--opt`` overrides followed by a typed ``(key, value)`` pair for every given flag of
    ``mapping`` (flag name -> config key): explicit flags win over config files and --opt."""
    out: List[Any] = list(args.opt)
    for flag, key in mapping.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append((key, value))
    return out


# ----------------------------------------------------------------------------- the frame
def run_main(main: Callable[[], Any]) -> None:
    """Call ``main``; on failure print one message per rank (only rank 0 for an error marked
    ``same_on_every_rank``: the others exit quietly with the same code), tear down, exit non-zero."""
    try:
        main()
    except KeyboardInterrupt:
        _exit(130, f"[rank {dist.get_rank()}] interrupted")
    except StopRequested as exc:
        _exit(exc.exit_code, f"[rank {dist.get_rank()}] {exc}")
    except Exception as exc:
        if not is_user_error(exc):
            _unexpected(exc)
        code = 2 if isinstance(exc, ConfigError) else 1
        if getattr(exc, "same_on_every_rank", False):  # e.g. a bad flag or a missing file: rank 0 reports
            rank = dist.get_rank() if dist.is_dist() else int(os.environ.get("RANK", "0") or 0)
            if rank != 0:
                time.sleep(2.0)  # let rank 0 report before torchrun stops the job
                _exit(code, None)
            _exit(code, f"[rank 0] error: {one_line(exc)}")
        _exit(code, f"[rank {dist.get_rank()}] error: {one_line(exc)}")
    dist.cleanup()


def _unexpected(exc: BaseException) -> None:
    """A failure that is no input error: its traceback, unless a peer's failure caused it."""
    if find_in_chain(exc, KeyboardInterrupt) is not None:  # a Ctrl-C that a library wrapped in its own error
        _exit(130, f"[rank {dist.get_rank()}] interrupted")
    if is_peer_failure(exc):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        _exit(1, f"[rank {dist.get_rank()}] error: stopped because another rank failed or left (its own message "
                 f"says why): {first}")
    _exit(1, f"[rank {dist.get_rank()}] unexpected error:\n{traceback.format_exc()}")


PEER_FAILURE_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                         "NCCL communicator was aborted", "the remote end", "Socket Timeout")


def is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another process of the job went away (gloo, NCCL)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(message in text for message in PEER_FAILURE_MESSAGES)


def _exit(code: int, message: Optional[str]) -> None:
    if message is not None:
        write_line_whole(message)
    dist.cleanup()
    sys.exit(code)


def write_line_whole(message: str) -> None:
    """``message`` and its newline to stderr in one write, so that the lines of ranks failing at
    the same moment never run into each other (a pipe keeps writes of up to 4 KiB whole)."""
    data = (message + "\n").encode("utf-8", "replace")
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor
        fd = None
    if fd != 2:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        return
    sys.stderr.flush()
    while data:
        data = data[os.write(fd, data):]


def script_main(args: argparse.Namespace, config_from_args: Callable[[argparse.Namespace], Any],
                body: Callable[[Any, "dist.DistContext"], Any], log_file: str) -> None:
    """The common frame of the experiment scripts: config from the parsed arguments, distributed
    init, CPU threads, rank-aware logging to ``OUTPUT_DIR/log_file``, then ``body(cfg, ctx)``;
    errors become one message per rank and a non-zero exit (see :func:`run_main`)."""

    def run() -> None:
        try:
            cfg = config_from_args(args)
        except Exception as exc:  # from the arguments and files alone: the same on every rank
            if is_user_error(exc):
                exc.same_on_every_rank = True  # type: ignore[attr-defined]
            raise
        if getattr(cfg.train, "deterministic", False):  # cuBLAS reads its setting once: before CUDA starts
            from experiment.engine import set_deterministic_cublas
            set_deterministic_cublas()
        ctx = dist.init_distributed(cfg.train.device)
        set_threads_for_cpu(ctx.world_size)
        if ctx.device.type == "cpu":
            keep_freed_memory()
        dist.setup_logging(cfg.output_dir, ctx.rank, filename=log_file)
        body(cfg, ctx)

    run_main(run)


def explicit_keys(specs: Sequence[str], opts: Sequence[Any], flags: Dict[str, str], args: argparse.Namespace,
                  section: str, keys: Sequence[str]) -> Dict[str, str]:
    """The ``section.key`` settings a user gave, each with where: a config file, ``--opt``, a flag."""
    from experiment.paths import find_config
    from utils.config import parse_override, read_yaml

    given: Dict[str, str] = {}
    for spec in specs:
        data = read_yaml(find_config(spec)).get(section)
        for key in keys:
            if isinstance(data, dict) and key in data:
                given[key] = f"{section}.{key} of {spec}"
    for text in opts:
        parts, _ = parse_override(text)
        if len(parts) == 2 and parts[0] == section and parts[1] in keys:
            given[parts[1]] = f"--opt {section}.{parts[1]}"
    for flag, key in flags.items():
        if key.startswith(section + ".") and key.split(".", 1)[1] in keys and getattr(args, flag, None) is not None:
            given[key.split(".", 1)[1]] = f"--{flag}"
    return given
