"""The training engine: the one loop every training run goes through.

A method (experiment/methods/) turns its config into a :class:`Task`: its data, its model,
its step's loss, what it optimises, how it evaluates.  :func:`fit` owns everything else, the
same for every method:

* the run directory: an earlier run is refused unless resumed or ``--overwrite``
  (experiment/run_dir.py); ``config.yaml``, ``train_log.jsonl``, TensorBoard, a progress bar;
* device placement (channels_last on CUDA), DistributedDataParallel, ``torch.compile``;
* the optimizer and the poly schedule, autocast and the gradient scaler;
* a finite check of every loss before the optimizer step, and of the weights before any save;
* SIGTERM/SIGUSR1: every rank stops after the same iteration with a checkpoint;
* ``last.pth`` (every epoch or ``checkpoint_interval`` iterations) and ``best.pth``, written
  atomically with every rank's RNG states: ``--resume`` continues exactly as the uninterrupted
  run would (bit for bit on a CPU, and on CUDA with ``--deterministic``), or is refused naming
  the settings that differ (experiment/checkpoints.py);
* ``--deterministic``: PyTorch's deterministic algorithms, strictly (an op without one is
  refused in one line; utils/determinism.py replaces the project's own), deterministic cuBLAS
  and cuDNN;
* periodic and final validation with the task's own evaluation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from experiment.acceleration import compile_model, place_model
from experiment.checkpoints import (RESUME_MAY_CHANGE, check_resume, checkpoint_status, flatten,
                                    load_training_checkpoint, rng_state, save_training_checkpoint, set_rng_state,
                                    state_is_finite_everywhere)
from experiment.errors import NonFiniteLossError, NonFiniteWeightsError, StopRequested, UserError
from experiment.evaluation import write_metrics
from experiment.history import History
from experiment.run_dir import TRAINING, Outputs, claim_output_dir, holding, remove_stale_temporaries
from experiment.runtime import Rank0Writer, autocast, on_main_first, resolve_amp, seed_everything
from experiment.schedule import batch_stream, iterations_per_epoch, poly_with_warmup
from experiment.signals import StopSignal
from utils import dist
from utils.config import config_to_dict, path_keys, save_config
from utils.io import atomic_write_bytes

log = logging.getLogger("experiment.engine")

Batch = Dict[str, Any]
StepOutput = Tuple[torch.Tensor, Dict[str, torch.Tensor], Any]  # loss, detached components, model outputs


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a task's step may need besides the model and the batch."""
    iteration: int
    epoch: int
    amp: Callable[[], Any]   # the run's autocast context


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer and its poly schedule with linear warm-up."""
    kind: str = "sgd"             # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9         # sgd
    weight_decay: float = 0.0
    nesterov: bool = False        # sgd
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 0.1    # the learning rate starts at lr * warmup_factor

    @classmethod
    def from_config(cls, optim, **changes: Any) -> "OptimizerSpec":
        """The optimizer of an ``optim`` section (experiment.config.OptimConfig), with ``changes``."""
        spec = cls(kind=optim.optimizer, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                   nesterov=optim.nesterov, poly_power=optim.poly_power, warmup_iters=optim.warmup_iters,
                   warmup_factor=optim.warmup_factor)
        return dataclasses.replace(spec, **changes)

    def build(self, params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.kind == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.nesterov)
        if self.kind == "adamw":
            # The fused kernel: on a CPU torch's default loop over the tensors costs ~8x its time (36
            # vs 4.6 ms a step for the synthetic regressor's 4.2 M parameters, one thread;
            # benchmarks/bench_optimizer.py).
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused or None)
        raise ValueError(f"optimizer kind must be sgd or adamw, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What the command line asks of a run besides its config."""
    resume: Any = False              # False, True ("" too) for OUTPUT_DIR/last.pth, a path, or "auto"
    overwrite: bool = False
    stop_after: Optional[int] = None


def _no_extra_state() -> Dict[str, Any]:
    return {}


@dataclasses.dataclass
class Task:
    """What a method hands the engine for one run.

    ``step(model, batch, info)`` returns the loss, its detached components (logged, checked) and
    the model's outputs; ``model`` is the trained module as wrapped (DDP, compile), ``info`` a
    :class:`StepInfo`.  ``evaluate(eval_model, iteration, final, writer)`` returns metrics
    (identical on every rank).  ``report(metrics)`` runs on rank 0 after the final validation
    (the method's tables and files)."""
    model: torch.nn.Module
    loader: Any
    step: Callable[[torch.nn.Module, Batch, StepInfo], StepOutput]
    optimizer: OptimizerSpec
    total: int
    samples_per_batch: int
    describe: str = ""
    name: str = "train"                       # the progress bar's label
    parameters: Optional[List[torch.nn.Parameter]] = None       # default: the model's, requiring grad
    evaluate: Optional[Callable[..., Dict[str, Any]]] = None
    best_metric: Optional[str] = None         # best.pth keeps the highest value of this metric
    val_interval: int = 0                     # epochs between validations (0: only at the end)
    checkpoint_interval: int = 0              # iterations between last.pth writes (0: every epoch's end)
    find_unused_parameters: bool = False
    fields: Dict[str, Any] = dataclasses.field(default_factory=dict)  # stored, and compared on resume
    extra_state: Callable[[], Dict[str, Any]] = _no_extra_state        # method state in checkpoints
    load_extra_state: Optional[Callable[[Mapping[str, Any]], None]] = None
    log_images: Optional[Callable[[Rank0Writer, Batch, Any, int], None]] = None
    metrics_line: Optional[Callable[[Dict[str, Any]], str]] = None
    report: Optional[Callable[[Dict[str, Any]], None]] = None
    resume_may_change: Mapping[str, str] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- fit
def fit(cfg, ctx: dist.DistContext, build: Callable[[Any, dist.DistContext], Task], *,
        prepare: Optional[Callable[[Any, dist.DistContext, RunOptions], None]] = None,
        resume: Union[bool, str, None] = False, stop_after: Optional[int] = None, overwrite: bool = False,
        outputs: Outputs = TRAINING) -> Tuple[Dict[str, Any], torch.nn.Module]:
    """Train the task that ``build(cfg, ctx)`` makes; return the final validation metrics
    (identical on every rank; empty when stopped early by ``stop_after``) and the trained
    network (without its wrappers).

    ``cfg`` has ``output_dir`` and a ``train`` section of experiment.config.RunConfig's fields.
    ``resume``: True (or "") continues OUTPUT_DIR/last.pth, a path continues that checkpoint,
    "auto" continues OUTPUT_DIR/last.pth when it exists and starts anew otherwise.
    ``prepare(cfg, ctx, options)`` runs after the directory is claimed and before the run is
    seeded (files the run needs, e.g. a regressor trained first).  SIGTERM/SIGUSR1 end the run after the
    current iteration with a checkpoint on every rank (StopRequested)."""
    stop = StopSignal(grace=cfg.train.stop_timeout)
    resume = resume_setting(cfg, resume)
    check_same_settings(cfg, ctx)
    with stop.installed(), holding(cfg.output_dir):
        last_path = os.path.join(cfg.output_dir, "last.pth")
        resume_path = _resume_path(resume, last_path, cfg.output_dir)
        resuming_here = resume_path is not None and os.path.abspath(resume_path) == os.path.abspath(last_path)

        def claim() -> None:
            claim_output_dir(cfg.output_dir, outputs, overwrite=overwrite, resuming_here=resuming_here)
            remove_stale_temporaries(cfg.output_dir)

        on_main_first(claim)
        _set_determinism(cfg.train.deterministic, ctx.device)
        with refusing_nondeterministic_ops(cfg.train.deterministic):
            if prepare is not None:
                prepare(cfg, ctx, RunOptions(resume, overwrite, stop_after))
            seed_everything(cfg.train.seed + ctx.rank)
            trainer = Trainer(cfg, ctx, build(cfg, ctx), stop)
            trainer.restore(resume_path, resuming_here)
            if ctx.is_main:  # after the resume checks: a refused resume leaves the run's config.yaml alone
                save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
            return trainer.run(stop_after), trainer.net


def resume_setting(cfg, resume: Union[bool, str, None]) -> Union[bool, str, None]:
    """The command line's ``--resume``, else the config's ``train.resume`` ("auto")."""
    if resume in (None, False) and getattr(cfg.train, "resume", "off") == "auto":
        return "auto"
    return resume


def _resume_path(resume: Union[bool, str, None], last_path: str, output_dir: str) -> Optional[str]:
    if resume is None or resume is False:
        return None
    if resume == "auto":
        return last_path if os.path.isfile(last_path) else None
    path = last_path if resume is True or resume == "" else str(resume)
    if not os.path.isfile(path):
        raise UserError(f"cannot resume: checkpoint {path} does not exist"
                        + ("" if os.path.exists(output_dir) else f" (no directory {output_dir})"))
    return path


def check_same_settings(cfg, ctx: dist.DistContext) -> None:
    """Ranks started with different settings (a batch size, a learning rate) would train
    different things or wait for each other forever: refuse, naming the keys, on every rank.
    Paths and what a resume may change (loader workers, logging) may differ between nodes."""
    if ctx.world_size == 1:
        return
    settings = dist.all_gather_object(flatten(config_to_dict(cfg)))
    reference, paths = settings[0], {".".join(key) for key in path_keys(type(cfg))}
    differ = sorted(key for key in set().union(*settings)
                    if key not in RESUME_MAY_CHANGE and key not in paths
                    and any(rank.get(key) != reference.get(key) for rank in settings[1:]))
    if differ:
        shown = "; ".join(f"{key}: " + ", ".join(f"{rank.get(key)!r} on rank {r}" for r, rank in enumerate(settings))
                          for key in differ[:5])
        raise UserError(f"the ranks were started with different settings ({shown}); start every rank with the "
                        "same config and flags")


# cuBLAS is deterministic with a fixed workspace: PyTorch accepts these two settings.
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def set_deterministic_cublas() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for ``--deterministic``.  cuBLAS reads it once, at
    its first call, so the scripts set it at config load, before CUDA starts; once CUDA runs,
    another value is refused."""
    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value in DETERMINISTIC_CUBLAS:
        return
    wanted = DETERMINISTIC_CUBLAS[0]
    if torch.cuda.is_initialized():
        raise UserError(f"--deterministic (train.deterministic) needs CUBLAS_WORKSPACE_CONFIG={wanted} before CUDA "
                        f"starts, but CUDA was started with {'it unset' if value is None else repr(value)}; export "
                        f"CUBLAS_WORKSPACE_CONFIG={wanted} before starting Python")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = wanted


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    """``deterministic``: PyTorch's deterministic algorithms, strictly (an op without one stops the
    run, see :func:`refusing_nondeterministic_ops`), deterministic cuBLAS and cuDNN, no cuDNN
    benchmark.  Otherwise none of these, and cuDNN benchmarks its convolutions on CUDA."""
    if deterministic:
        set_deterministic_cublas()
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


NO_DETERMINISTIC_KERNEL = "does not have a deterministic implementation"


def nondeterminism_message(error: str) -> Optional[str]:
    """One line for PyTorch's refusal of a nondeterministic op (``error``), else None."""
    where = "--deterministic (train.deterministic)"
    if NO_DETERMINISTIC_KERNEL in error:
        op = error.split(NO_DETERMINISTIC_KERNEL)[0].strip()
        return f"{where}: {op} has no deterministic implementation on this device; train without --deterministic"
    if "CUBLAS_WORKSPACE_CONFIG" in error:
        return (f"{where}: cuBLAS started before CUBLAS_WORKSPACE_CONFIG was set; export "
                f"CUBLAS_WORKSPACE_CONFIG={DETERMINISTIC_CUBLAS[0]} before starting Python")
    return None


@contextlib.contextmanager
def refusing_nondeterministic_ops(deterministic: bool):
    """Under ``--deterministic``, PyTorch's error for an op with no deterministic implementation
    on this device becomes one line naming the op and the setting."""
    try:
        yield
    except RuntimeError as exc:
        message = nondeterminism_message(str(exc)) if deterministic else None
        if message is None:
            raise
        raise UserError(message) from exc


def check_finite(losses: Mapping[str, torch.Tensor], iteration: int, epoch: int, checkpoint_path: str,
                 stop_requested: bool = False) -> bool:
    """Raise NonFiniteLossError, on every rank at once, if any loss component of any rank is
    NaN or infinite.  One small all-reduce and one host sync per iteration: the price of never
    letting a NaN reach the weights (the optimizer step comes after this check).  The same
    all-reduce carries ``stop_requested`` (e.g. a SIGTERM on this rank): returns True on every
    rank when any rank asked to stop, so that all of them stop at the same iteration."""
    names = list(losses)
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    flags = torch.stack([torch.isfinite(values).all().float(),
                         torch.full((), -1.0 if stop_requested else 0.0, device=values.device)])
    dist.all_reduce(flags, op="min")
    finite, stop = flags.tolist()
    if finite >= 1:
        return stop < 0
    bad = {n: v for n, v in zip(names, values.tolist()) if not math.isfinite(v)}
    where = ", ".join(f"{n} = {v}" for n, v in bad.items()) if bad else "on another rank"
    raise NonFiniteLossError(f"non-finite loss at iteration {iteration} (epoch {epoch}): {where}; "
                             f"training stopped before the optimizer step, {checkpoint_status(checkpoint_path)}")


# ----------------------------------------------------------------------------- the loop
class Trainer:
    """One run of a task: built by :func:`fit`, which restores its state and runs it."""

    def __init__(self, cfg, ctx: dist.DistContext, task: Task, stop: StopSignal):
        self.cfg, self.ctx, self.task, self.stop = cfg, ctx, task, stop
        self.device = ctx.device
        self.amp_dtype = resolve_amp(cfg.train.amp, self.device)
        self.last_path = os.path.join(cfg.output_dir, "last.pth")
        self.best_path = os.path.join(cfg.output_dir, "best.pth")
        self.net = place_model(task.model, self.device)  # channels_last on CUDA
        model = DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda"
                                        else None, find_unused_parameters=task.find_unused_parameters) \
            if ctx.distributed else self.net
        # --compile: the training step's model and, separately, the eval forward; checkpoints are
        # written from `net`, the plain module (no `_orig_mod.` keys).
        self.model = compile_model(model, cfg.train.compile)
        self.eval_model = compile_model(self.net, cfg.train.compile)
        params = task.parameters if task.parameters is not None else list(self.net.parameters())
        self.optimizer = task.optimizer.build([p for p in params if p.requires_grad])
        spec = task.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_with_warmup(task.total, spec.poly_power, spec.warmup_iters, spec.warmup_factor))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.per_epoch = iterations_per_epoch(task.loader)
        self.start, self.best = 0, -math.inf
        self.writer: Rank0Writer = Rank0Writer("", False)

    def amp(self):
        return autocast(self.device, self.amp_dtype)

    # -- state
    def restore(self, path: Optional[str], resuming_here: bool) -> None:
        self.resuming_here = resuming_here
        if path is None:
            return
        state = load_training_checkpoint(path)
        notices = check_resume(state, path, config_to_dict(self.cfg), world_size=self.ctx.world_size,
                               iterations_per_epoch=self.per_epoch, total_iterations=self.task.total,
                               model_fields=self.task.fields,
                               may_change={**RESUME_MAY_CHANGE, **self.task.resume_may_change})
        try:
            self.net.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.task.load_extra_state is not None:
                self.task.load_extra_state(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"checkpoint {path} does not fit this model/optimizer: "
                            f"{str(exc).strip().splitlines()[0]}") from exc
        set_rng_state(state["rng"][self.ctx.rank])
        self.start = int(state["iteration"])
        self.best = float(state.get(self._best_key(), -math.inf))
        if not resuming_here and self.task.best_metric is not None and not on_main_first(lambda: self._adopt_best(path)):
            self.best = -math.inf  # the source run's best.pth is not there: this run's validations choose anew
        for line in notices:
            log.info("resume: %s", line)
        log.info("resumed from %s at iteration %d/%d (epoch %d): it continues exactly as the uninterrupted run",
                 path, self.start, self.task.total, state.get("epoch", self.start // self.per_epoch))

    def _adopt_best(self, source: str) -> bool:
        """A run continued in another directory starts with the source run's best.pth beside it,
        so that its best.pth is the best of the whole run; False when there is none."""
        source_best = os.path.join(os.path.dirname(os.path.abspath(source)), "best.pth")
        if not os.path.isfile(source_best):
            log.info("resume: no best.pth beside %s: best.pth here is chosen among this run's validations", source)
            return False
        with open(source_best, "rb") as f:
            atomic_write_bytes(self.best_path, f.read())
        log.info("resume: best.pth of %s copied to %s", os.path.dirname(os.path.abspath(source)), self.best_path)
        return True

    def _best_key(self) -> str:
        return f"best_{self.task.best_metric or 'metric'}"

    def checkpoint(self, path: str, iteration: int, epoch: int, metrics: Optional[Dict[str, Any]] = None) -> None:
        bad = state_is_finite_everywhere(self.net.state_dict(), self.device)
        if bad is not None:  # never replace a good checkpoint with a poisoned one
            raise NonFiniteWeightsError(
                f"weights hold NaN or Inf at iteration {iteration} ({bad}): {path} was not written; "
                f"{checkpoint_status(self.last_path)}. Lower the learning rate or check the data")
        rngs = dist.all_gather_object(rng_state())
        if self.ctx.is_main:
            save_training_checkpoint(path, {
                "state_dict": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "iteration": iteration, "rng": rngs, self._best_key(): self.best,
                **self.task.fields, "config": config_to_dict(self.cfg), "iterations_per_epoch": self.per_epoch,
                "total_iterations": self.task.total, "metrics": metrics or {}, **self.task.extra_state()})

    # -- validation
    def validate(self, iteration: int, epoch: int, final: bool = False) -> Dict[str, Any]:
        if self.task.evaluate is None:
            metrics: Dict[str, Any] = {}
        else:
            metrics = self.task.evaluate(self.eval_model, iteration, final, self.writer)
        metrics.update(iteration=iteration, epoch=epoch)
        if self.task.evaluate is not None and self.ctx.is_main:
            write_metrics(metrics, self.writer, self.cfg.output_dir, iteration,
                          filename=f"metrics_iter{iteration:07d}.json")
            if self.task.metrics_line is not None:
                log.info("validation at iteration %d: %s", iteration, self.task.metrics_line(metrics))
        metric = self.task.best_metric
        if metric is not None and metrics.get(metric) is not None and metrics[metric] > self.best:
            self.best = metrics[metric]
            self.checkpoint(self.best_path, iteration, epoch, metrics)
        self.model.train()
        return metrics

    # -- training
    def run(self, stop_after: Optional[int]) -> Dict[str, Any]:
        cfg, task = self.cfg, self.task
        self.writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), self.ctx.is_main,
                                  purge_step=self.start + 1 if self.start else None)
        if task.describe:
            log.info("%s; %d iterations (%d epochs x %d) x %d processes; amp %s", task.describe, task.total,
                     math.ceil(task.total / self.per_epoch), self.per_epoch, self.ctx.world_size,
                     self.amp_dtype or "off")
        stop_at = min(task.total, stop_after) if stop_after is not None else task.total
        history_path = os.path.join(cfg.output_dir, "train_log.jsonl")
        on_main_first(lambda: History(history_path, True, self.start) and None)  # trims it; errors reach every rank
        self.history = History(history_path, self.ctx.is_main)
        started = time.time()
        finished = self._loop(stop_at)
        loop_seconds = time.time() - started
        if finished > self.start or not self.resuming_here:
            self.checkpoint(self.last_path, finished, finished // self.per_epoch)
        if finished < task.total:
            log.info("stopped after iteration %d of %d; continue with --resume", finished, task.total)
            self.writer.close()
            return {}
        metrics = self.validate(task.total, math.ceil(task.total / self.per_epoch), final=True)
        if finished > self.start:  # the training loop's wall time per step (epoch-end checkpoints included)
            metrics["train_seconds_per_iteration"] = loop_seconds / (finished - self.start)
        if self.ctx.is_main:
            if task.evaluate is not None:
                write_metrics(metrics, self.writer, cfg.output_dir, task.total)
            if task.report is not None:
                task.report(metrics)
        self.writer.close()
        return metrics

    def _loop(self, stop_at: int) -> int:
        """Iterations ``start`` .. ``stop_at``; returns the iteration count reached."""
        task, done = self.task, self.start
        bar = tqdm(total=task.total, initial=self.start, desc=task.name, unit="it", disable=not self.ctx.is_main,
                   dynamic_ncols=True)
        self.model.train()
        self._sums: Dict[str, torch.Tensor] = {}
        self._seen, self._t0 = 0, time.time()
        last_epoch = self.start // self.per_epoch
        for epoch, iteration, batch in batch_stream(task.loader, self.start, stop_at):
            if epoch != last_epoch:  # an epoch just ended
                self._epoch_end(iteration, epoch)
                last_epoch = epoch
            stop_now = self._step(batch, iteration, epoch)
            done = iteration + 1
            self._log(done, epoch, stop_at, bar)
            if self.cfg.train.image_interval and done % self.cfg.train.image_interval == 0 and task.log_images:
                task.log_images(self.writer, batch, self._outputs, done)
            if task.checkpoint_interval and done % task.checkpoint_interval == 0 and done < stop_at:
                self.checkpoint(self.last_path, done, epoch)
            if stop_now:  # a rank got SIGTERM: all stop here, with a checkpoint, before the scheduler kills
                self._stop(done, epoch, bar)
            bar.update(1)
        bar.close()
        return done

    def _epoch_end(self, iteration: int, epoch: int) -> None:
        if not self.task.checkpoint_interval:
            self.checkpoint(self.last_path, iteration, epoch)
        if self.task.val_interval and epoch % self.task.val_interval == 0 and iteration < self.task.total:
            self.validate(iteration, epoch)

    def _step(self, batch: Batch, iteration: int, epoch: int) -> bool:
        loss, components, self._outputs = self.task.step(self.model, batch, StepInfo(iteration, epoch, self.amp))
        stop_now = check_finite({"total": loss, **components}, iteration, epoch, self.last_path,
                                self.stop.requested)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        for name, value in [("total", loss.detach())] + list(components.items()):
            self._sums[name] = self._sums.get(name, 0.0) + value.float()
        self._seen += 1
        return stop_now

    def _log(self, done: int, epoch: int, stop_at: int, bar) -> None:
        if done % self.cfg.train.log_interval != 0 and done != stop_at:
            return
        means = torch.stack([self._sums[k] / self._seen for k in self._sums])
        dist.all_reduce(means, op="mean")
        means = dict(zip(self._sums, means.tolist()))
        rate = self._seen * self.task.samples_per_batch * self.ctx.world_size / max(1e-9, time.time() - self._t0)
        lr = self.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{means['total']:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        for name, value in means.items():
            self.writer.add_scalar(f"loss/{name}", value, done)
        self.writer.add_scalar("train/lr", lr, done)
        self.writer.add_scalar("train/samples_per_second", rate, done)
        self.history.write({"iteration": done, "epoch": epoch, "lr": lr, **means})
        self._sums, self._seen, self._t0 = {}, 0, time.time()

    def _stop(self, done: int, epoch: int, bar) -> None:
        self.checkpoint(self.last_path, done, epoch)
        bar.close()
        self.writer.close()
        raise StopRequested(f"stopped by {self.stop.name() if self.stop.requested else 'a signal to another rank'} "
                            f"after iteration {done} of {self.task.total}: checkpoint {self.last_path} written; "
                            "continue with --resume", self.stop.exit_code())
