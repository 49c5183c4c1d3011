"""Pieces shared by the experiment scripts: AMP choice, seeding, rank-0 TensorBoard,
and a main-wrapper that turns errors into one clear message and a non-zero exit on
every rank (so a torchrun job fails fast instead of hanging)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from models import CheckpointMismatchError
from utils import dist
from utils.config import ConfigError, add_config_arguments
from utils.io import find_in_chain

log = logging.getLogger("experiment")


class UserError(Exception):
    """An error caused by the user's input (a file, a flag, a dataset): shown without a traceback."""


class StopRequested(Exception):
    """A stop signal (SIGTERM) reached some rank: every rank saved a checkpoint and stops with
    ``exit_code`` (128 + the signal number, as a shell reports a process ended by it)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# OSError: unreadable/corrupt files, unwritable directories, a full disk (utils.io names the file).
USER_ERRORS = (UserError, ConfigError, FileNotFoundError, ValueError, KeyError, CheckpointMismatchError, OSError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line: a KeyError's key unquoted, the original message of an
    error re-raised by a DataLoader worker (not its copied traceback), never blank."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = str(text).strip()
    if "Original Traceback" in text:  # DataLoader workers re-raise "Caught X in ...\n<traceback>"
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = last.split(": ", 1)[1] if last.startswith(type(exc).__name__ + ":") else last
    return text or f"{type(exc).__name__} (no message)"


def str2bool(text: str) -> bool:
    """argparse type for the reference's ``--has_edge True`` style flags."""
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "on", "t", "y"):
        return True
    if lowered in ("false", "0", "no", "off", "f", "n", "none"):
        return False
    raise ValueError(f"expected a boolean (True/False), got {text!r}")


def script_parser(doc: str, output_help: str, opt_example: str = "optim.lr=0.01 train.amp=false",
                  config_required: bool = False) -> argparse.ArgumentParser:
    """The arguments every experiment script shares: --config/--opt, --output_dir (or --output-dir),
    --dataset_dir (or --dataset-dir), --device, and torch.distributed.launch's --local_rank
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
                        help="Cityscapes root (default: $CITYSCAPES_DATASET, else the synthetic dataset)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: CUDA when available")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


SHARED_FLAGS = {"output_dir": "output_dir", "dataset_dir": "data.dataset_dir", "device": "train.device"}


# Test-time inference flags shared by validation and infer (flag -> config key).
INFERENCE_FLAGS = {"scales": "model.eval_scales", "sliding_window": "val.sliding_window",
                   "window_size": "val.window_size", "window_stride": "val.window_stride", "flip": "val.flip"}


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """--scales, --sliding_window/--window_size/--window_stride and --flip (experiment/inference.py)."""
    parser.add_argument("--scales", help="HMS: its attention scales, e.g. 0.25,0.5,1.0,2.0; other archs: scales "
                        "whose logits are averaged, e.g. 0.75,1.0,1.25 (model.eval_scales)")
    parser.add_argument("--sliding_window", type=str2bool, nargs="?", const=True, default=None,
                        help="average the logits of overlapping --window_size crops (val.sliding_window)")
    parser.add_argument("--window_size", help="sliding-window crop H,W (default 1024,1024)")
    parser.add_argument("--window_stride", help="sliding-window stride H,W (default 768,768)")
    parser.add_argument("--flip", type=str2bool, nargs="?", const=True, default=None,
                        help="average with the horizontally flipped image's prediction (val.flip)")


def normalise_inference_flags(args: argparse.Namespace) -> None:
    """In place: --scales and the window sizes as YAML lists ("H,W", or one number for a square)."""
    if getattr(args, "scales", None) is not None:
        args.scales = "[" + str(args.scales) + "]"
    for flag in ("window_size", "window_stride"):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(args, flag, "[" + (value if "," in str(value) else f"{value},{value}") + "]")


def flag_overrides(args: argparse.Namespace, mapping: Dict[str, str]) -> List[str]:
    """``--opt`` overrides followed by ``key=value`` for every given flag of ``mapping``
    (flag name -> config key): explicit flags win over config files and --opt."""
    out = list(args.opt)
    for flag, key in mapping.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def resolve_amp(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """'auto': bf16 on CUDA, off on CPU; 'off'; 'fp16'; 'bf16'.  Returns the autocast dtype or None."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mode in ("off", "false", "none"):
        return None
    if mode in ("bf16", "on", "true"):
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    raise ConfigError(f"amp must be one of auto, off, fp16, bf16; got {mode!r}")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class Rank0Writer:
    """TensorBoard on rank 0, silent elsewhere; also a no-op after ``close``.  ``purge_step``: a
    resumed run hides the events an interrupted run wrote at or after that step."""

    def __init__(self, log_dir: str, enabled: bool, purge_step: Optional[int] = None):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        writer = self.__dict__.get("_writer")
        if writer is None:
            return lambda *args, **kwargs: None
        return getattr(writer, name)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def on_main_first(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (e.g. make a dataset), then share its result or its error
    with every rank, so that all of them fail together instead of waiting forever."""
    result, error, caught = None, None, None
    if dist.is_main_process():
        try:
            result = fn()
        except USER_ERRORS as exc:
            caught = exc
            error = one_line(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {one_line(exc)}"
    shared = dist.broadcast_object((result, error))
    result, error = shared
    if caught is not None:  # rank 0 reports its own error as it is
        raise caught
    if error is not None:
        raise UserError(f"on rank 0: {error}")
    return result


def run_main(main: Callable[[], Any]) -> None:
    """Call ``main``; on failure print one message per rank (only rank 0 for an error marked
    ``same_on_every_rank``: the others exit quietly with the same code), tear down, exit non-zero."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"[rank {dist.get_rank()}] interrupted", file=sys.stderr)
        dist.cleanup()
        sys.exit(130)
    except StopRequested as exc:
        print(f"[rank {dist.get_rank()}] {exc}", file=sys.stderr)
        sys.stderr.flush()
        dist.cleanup()
        sys.exit(exc.exit_code)
    except USER_ERRORS as exc:
        code = 2 if isinstance(exc, ConfigError) else 1
        if getattr(exc, "same_on_every_rank", False):  # e.g. a bad flag or a missing file: rank 0 reports
            rank = dist.get_rank() if dist.is_dist() else int(os.environ.get("RANK", "0") or 0)
            if rank != 0:
                time.sleep(2.0)  # let rank 0 report before torchrun stops the job
                dist.cleanup()
                sys.exit(code)
            print(f"[rank 0] error: {one_line(exc)}", file=sys.stderr)
        else:
            print(f"[rank {dist.get_rank()}] error: {one_line(exc)}", file=sys.stderr)
        sys.stderr.flush()
        dist.cleanup()
        sys.exit(code)
    except Exception as exc:  # an unexpected failure: keep the traceback
        if find_in_chain(exc, KeyboardInterrupt) is not None:  # a Ctrl-C that a library wrapped in its own error
            print(f"[rank {dist.get_rank()}] interrupted", file=sys.stderr)
            dist.cleanup()
            sys.exit(130)
        print(f"[rank {dist.get_rank()}] unexpected error:\n{traceback.format_exc()}", file=sys.stderr)
        sys.stderr.flush()
        dist.cleanup()
        sys.exit(1)
    dist.cleanup()


def script_main(args: argparse.Namespace, config_from_args: Callable[[argparse.Namespace], Any],
                body: Callable[[Any, "dist.DistContext"], Any], log_file: str) -> None:
    """The common frame of the experiment scripts: config from the parsed arguments, distributed
    init, CPU threads, rank-aware logging to ``OUTPUT_DIR/log_file``, then ``body(cfg, ctx)``;
    errors become one message per rank and a non-zero exit (see :func:`run_main`)."""

    def run() -> None:
        try:
            cfg = config_from_args(args)
        except USER_ERRORS as exc:  # from the arguments and files alone: the same on every rank
            exc.same_on_every_rank = True  # type: ignore[attr-defined]
            raise
        ctx = dist.init_distributed(cfg.train.device)
        set_threads_for_cpu(ctx.world_size)
        dist.setup_logging(cfg.output_dir, ctx.rank, filename=log_file)
        body(cfg, ctx)

    run_main(run)


def set_threads_for_cpu(world_size: int) -> None:
    """Share the machine's cores between local CPU processes (torchrun sets OMP_NUM_THREADS=1
    only when it is unset, and a single process keeps torch's default)."""
    if "OMP_NUM_THREADS" in os.environ or world_size <= 1:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
