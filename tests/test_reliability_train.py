"""Reliability of training: a finished run is never silently replaced, a checkpoint
never holds NaN/Inf, --resume continues exactly or says which settings stop it, a torn log
line does not block a resume, SIGTERM ends with a checkpoint, and user mistakes are one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiment.cli import run_main
from experiment.errors import UserError
from experiment.config import ExperimentConfig
from experiment.checkpoints import load_training_checkpoint
from experiment.errors import NonFiniteLossError, NonFiniteWeightsError
from experiment.methods import train
from experiment.train import build_parser
from utils import dist
from utils.config import load_config
from utils.errors import UnreadableInputError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"


def settings(root, out, regressor, **extra):
    base = {
        "output_dir": out, "data.dataset_dir": root, "data.crop_size": "[64, 128]",
        "data.scale_range": "[0.75, 1.0]", "data.class_uniform_fraction": 0.0, "data.num_workers": 0,
        "model.arch": "lighthrnet.HRNet16", "model.has_edge": "true", "loss.inverseform_path": regressor,
        "loss.inverseform_tile_factor": 1, "optim.lr": 0.01, "train.epochs": 2, "train.max_iters": 4,
        "train.batch_size": 2, "train.log_interval": 1, "train.image_interval": 0, "train.val_interval": 0,
        "train.checkpoint_interval": 0, "train.device": "cpu", "train.amp": "off", "val.batch_size": 2,
        "val.num_workers": 0, "val.max_images": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def config(*args, **kwargs):
    return load_config(ExperimentConfig, [], settings(*args, **kwargs))


def iterations(out):
    return [json.loads(line)["iteration"] for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stopped_run(tiny_cityscapes, regressor, tmp_path_factory):
    """A run stopped (with its checkpoint) after iteration 2 of 4; tests copy it before touching it."""
    for key in dist.ENV_KEYS:
        os.environ.pop(key, None)
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(config(tiny_cityscapes, out, regressor), dist.init_distributed("cpu"), stop_after=2)
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------- the run directory
def test_a_finished_run_is_not_replaced_without_overwrite(tiny_cityscapes, regressor, tmp_path, ctx):
    out = tmp_path / "run"
    train(config(tiny_cityscapes, out, regressor, **{"train.max_iters": 1}), ctx)
    before = {name: (out / name).read_bytes() for name in ("last.pth", "best.pth", "train_log.jsonl", "metrics.json")}
    with pytest.raises(UserError, match=rf"output_dir {out} already holds the outputs of an earlier run.*--resume"):
        train(config(tiny_cityscapes, out, regressor, **{"train.max_iters": 1}), ctx)
    assert {name: (out / name).read_bytes() for name in before} == before
    # --overwrite: the earlier outputs move aside, whole; the new run starts from scratch
    train(config(tiny_cityscapes, out, regressor, **{"train.max_iters": 1}), ctx, overwrite=True)
    (moved,) = out.glob("replaced-*")
    assert {name: (moved / name).read_bytes() for name in before} == before
    assert (moved / "tensorboard").is_dir() and len(list((out / "tensorboard").iterdir())) == 1
    assert iterations(out) == [1]


# -------------------------------------------------------------- finite weights
def test_non_finite_weights_are_never_checkpointed(tiny_cityscapes, regressor, tmp_path, ctx, monkeypatch):
    from experiment.engine import OptimizerSpec

    class PoisonedSGD(torch.optim.SGD):
        def step(self, closure=None):  # what lr=1e30 does, without waiting for the overflow
            out = super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
            return out

    def poisoning_optimizer(spec, params):
        return PoisonedSGD(params, lr=spec.lr, momentum=spec.momentum)

    monkeypatch.setattr(OptimizerSpec, "build", poisoning_optimizer)
    with pytest.raises(NonFiniteWeightsError, match=r"iteration 1 .*last.pth was not written; no checkpoint was "
                                                    r"written yet"):
        train(config(tiny_cityscapes, tmp_path, regressor, **{"train.checkpoint_interval": 1}), ctx)
    assert not (tmp_path / "last.pth").exists() and not list(tmp_path.glob(".*.tmp"))


def test_non_finite_loss_message_says_what_is_on_disk(tiny_cityscapes, regressor, tmp_path, ctx, monkeypatch):
    from experiment.methods import segmentation as losses

    real = losses.SegmentationObjective.forward

    def nan_loss(self, outputs, label, edge):
        total, parts = real(self, outputs, label, edge)
        return total * float("nan"), parts

    monkeypatch.setattr(losses.SegmentationObjective, "forward", nan_loss)
    with pytest.raises(NonFiniteLossError, match="iteration 0 .*no checkpoint was written yet"):
        train(config(tiny_cityscapes, tmp_path, regressor), ctx)


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("change, named", [
    ({"optim.lr": 0.02}, "optim.lr 0.01 -> 0.02"),
    ({"train.batch_size": 1}, "train.batch_size 2 -> 1"),
    ({"train.max_iters": 6}, "train.max_iters 4 -> 6"),
    ({"model.arch": "ocrnet.AuxHRNet", "model.hrnet_base": 18}, "arch 'lighthrnet.HRNet16' in the checkpoint"),
])
def test_resume_refuses_settings_that_cannot_continue_exactly(change, named, stopped_run, tiny_cityscapes,
                                                             regressor, tmp_path, ctx):
    out = copy_run(stopped_run, tmp_path / "run")
    saved_config = (out / "config.yaml").read_text()
    with pytest.raises(UserError, match="cannot resume exactly from .*" + named.replace(".", r"\.")):
        train(config(tiny_cityscapes, out, regressor, **change), ctx, resume=True)
    assert (out / "config.yaml").read_text() == saved_config  # the refused settings are not recorded
    assert load_training_checkpoint(str(out / "last.pth"))["iteration"] == 2


def test_resume_refuses_another_world_size_and_a_checkpoint_past_the_end(stopped_run, tiny_cityscapes, regressor,
                                                                         tmp_path, ctx):
    out = copy_run(stopped_run, tmp_path / "run")
    state = torch.load(out / "last.pth", weights_only=True)
    torch.save(dict(state, rng=state["rng"] * 2), out / "last.pth")
    with pytest.raises(UserError, match="2 processes wrote it, 1 now"):
        train(config(tiny_cityscapes, out, regressor), ctx, resume=True)
    torch.save(dict(state, iteration=20), out / "last.pth")
    with pytest.raises(UserError, match=r"iteration 20, past this run's end \(4 iterations\)"):
        train(config(tiny_cityscapes, out, regressor), ctx, resume=True)


def test_allowed_changes_are_announced_and_resume_from_a_path(stopped_run, tiny_cityscapes, regressor, tmp_path,
                                                              ctx, caplog):
    out = tmp_path / "continued"
    caplog.set_level("INFO")
    train(config(tiny_cityscapes, out, regressor, **{"train.log_interval": 2}), ctx,
          resume=str(stopped_run / "last.pth"), stop_after=3)
    assert "train.log_interval changed 1 -> 2: affects logging cadence only" in caplog.text
    assert load_training_checkpoint(str(out / "last.pth"))["iteration"] == 3
    assert load_training_checkpoint(str(stopped_run / "last.pth"))["iteration"] == 2  # the source is untouched


def test_resume_flag_takes_an_optional_path():
    parse = build_parser().parse_args
    assert parse(["--config", "c.yaml", "--resume"]).resume is True
    assert parse(["--config", "c.yaml", "--resume", "runs/x/last.pth"]).resume == "runs/x/last.pth"
    assert parse(["--config", "c.yaml"]).resume is False


# ------------------------------------------------------------- the history log
def test_a_torn_last_log_line_is_dropped_on_resume(stopped_run, tiny_cityscapes, regressor, tmp_path, ctx, caplog):
    out = copy_run(stopped_run, tmp_path / "run")
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"iteration": 3, "epoch": 1, "lr": 0.00')  # a kill in the middle of an append
    caplog.set_level("WARNING")
    train(config(tiny_cityscapes, out, regressor), ctx, resume=True, stop_after=3)
    assert "dropping its torn last line" in caplog.text
    assert iterations(out) == [1, 2, 3]


def test_a_damaged_middle_log_line_names_the_file_and_line(stopped_run, tiny_cityscapes, regressor, tmp_path, ctx):
    out = copy_run(stopped_run, tmp_path / "run")
    lines = (out / "train_log.jsonl").read_text().splitlines()
    (out / "train_log.jsonl").write_text("\n".join(["{garbage"] + lines[1:]) + "\n")
    with pytest.raises(UserError, match=r"train_log.jsonl, line 1: not a JSON record"):
        train(config(tiny_cityscapes, out, regressor), ctx, resume=True)


# --------------------------------------------------- settings checked at start
def test_num_classes_that_does_not_fit_the_dataset_is_refused_at_start(tiny_cityscapes, regressor, tmp_path, ctx):
    with pytest.raises(UserError, match=r"'model.num_classes' is 10 but the .*dataset .* has 19 classes"):
        train(config(tiny_cityscapes, tmp_path, regressor, **{"model.num_classes": 10}), ctx)
    assert not (tmp_path / "last.pth").exists()


# ------------------------------------------------------------- one-line errors
def run_main_exit(fn, capsys):
    with pytest.raises(SystemExit) as info:
        run_main(fn)
    err = capsys.readouterr().err.strip()
    return info.value.code, err


def test_unwritable_output_dir_and_unreadable_checkpoint_are_one_line(tiny_cityscapes, regressor, tmp_path, ctx,
                                                                     capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = run_main_exit(lambda: train(config(tiny_cityscapes, blocker / "run", regressor), ctx), capsys)
    assert code == 1 and len(err.splitlines()) == 1 and str(blocker) in err and "Traceback" not in err
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"")
    code, err = run_main_exit(lambda: train(config(tiny_cityscapes, out, regressor), ctx, resume=True), capsys)
    assert code == 1 and err == f"[rank 0] error: cannot read checkpoint {out / 'last.pth'}: the file is empty (0 bytes)"


def test_disk_full_and_wrapped_ctrl_c_exit_codes(tmp_path, capsys, monkeypatch):
    from utils.io import atomic_torch_save

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, err = run_main_exit(lambda: atomic_torch_save({"x": 1}, tmp_path / "last.pth"), capsys)
    monkeypatch.undo()
    assert code == 1 and err == f"[rank 0] error: [Errno 28] cannot write {tmp_path / 'last.pth'}: No space left on device"

    def ctrl_c_in_writer():
        atomic_torch_save({"x": 1}, tmp_path / "x.pth")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("writer failed") from exc

    code, err = run_main_exit(ctrl_c_in_writer, capsys)
    assert code == 130 and err == "[rank 0] interrupted"


def test_dataloader_worker_errors_become_their_original_line(capsys):
    message = ("Caught UnreadableInputError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
               'last):\n  File "x.py", line 1, in f\nutils.errors.UnreadableInputError: cannot read image file /d/a.png: '
               "unreadable, truncated or not an image\n")

    def fail():  # DataLoader re-raises a worker's error as its own class with this text
        raise UnreadableInputError(message)

    code, err = run_main_exit(fail, capsys)
    assert code == 1
    assert err == "[rank 0] error: cannot read image file /d/a.png: unreadable, truncated or not an image"


# --------------------------------------------------------------------- SIGTERM
def cli(out, root, regressor, extra=()):
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    empty = Path(out).parent / "empty.yaml"
    empty.write_text("{}\n")  # the command line needs a --config; all settings come from --opt
    opts = settings(root, out, regressor, **{"train.max_iters": 40, "train.epochs": 20, "data.num_workers": 2})
    return subprocess.Popen([sys.executable, "-m", "experiment.train", "--config", str(empty), "--opt", *opts,
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_log(out, proc, lines=1, timeout=240):
    log = Path(out) / "train_log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.05)
    raise AssertionError("no progress")


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(tiny_cityscapes, regressor, tmp_path, ctx):
    out = tmp_path / "run"
    proc = cli(out, tiny_cityscapes, regressor)  # with 2 DataLoader workers
    wait_for_log(out, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process of the job, workers included
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped = load_training_checkpoint(str(out / "last.pth"))["iteration"]
    assert f"[rank 0] stopped by SIGTERM after iteration {stopped} of 40" in err and "Traceback" not in err
    assert 1 <= stopped < 40
    # resumed, it is the run that was never interrupted (shortened to 1 iteration past the stop;
    # the sample stream does not depend on the number of workers)
    end = {"train.max_iters": 40, "train.epochs": 20}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command ran (OMP_NUM_THREADS=1): the same float summation order
    try:
        _, resumed = train(config(tiny_cityscapes, out, regressor, **end), ctx, resume=True, stop_after=stopped + 1)
        _, straight = train(config(tiny_cityscapes, tmp_path / "straight", regressor, **end), ctx,
                            stop_after=stopped + 1)
    finally:
        torch.set_num_threads(threads)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert iterations(out) == list(range(1, stopped + 2))


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tiny_cityscapes, regressor, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "run"
    opts = settings(tiny_cityscapes, out, regressor, **{"train.max_iters": 40, "train.epochs": 40,
                                                        "train.batch_size": 1})
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(SCRIPTS / "train_until_signal.py"), str(tmp_path), json.dumps(opts)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_log(out, proc, lines=2, timeout=300)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    state = load_training_checkpoint(str(out / "last.pth"))
    assert len(state["rng"]) == 2
    assert f"[rank 1] stopped by SIGTERM after iteration {state['iteration']} of 40" in err, err[-3000:]
    assert f"[rank 0] stopped by a signal to another rank after iteration {state['iteration']} of 40" in err
    for rank in (0, 1):
        assert (tmp_path / f"exit{rank}").read_text() == "143"
