"""experiment.acceleration and experiment.background, and evaluate()'s batched device metrics:
channels_last chosen by device and output-preserving (infer and NUS included), torch.compile
wrapping (cheap 'eager' backend) with plain checkpoint keys, padded fixed-shape eval batches,
CUDA-only config overrides, one evaluation autocast for every entry point (best.pth chosen on
a standalone validation's numbers), the background writer, and evaluate() == the numpy oracle."""
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import models
from experiment import acceleration as acc
from experiment.background import BackgroundWriter, to_host
from experiment.config import ExperimentConfig
from experiment.methods.regressor import RegressorConfig
from experiment.run_config import load_run_config, will_use_cuda
from experiment.data import eval_loader, val_dataset
from experiment.evaluation import evaluate
from utils.metrics import boundary_accuracy, boundary_f_counts, boundary_f_from_counts


def test_channels_last_is_chosen_by_device_type():
    assert acc.use_channels_last(torch.device("cuda", 0)) and acc.use_channels_last("cuda")
    assert not acc.use_channels_last(torch.device("cpu"))
    assert acc.memory_format(torch.device("cuda")) == torch.channels_last
    assert acc.memory_format(torch.device("cpu")) == torch.contiguous_format
    net = acc.place_model(nn.Conv2d(3, 4, 3), torch.device("cpu"))
    assert net.weight.is_contiguous()


def test_models_give_the_same_outputs_in_channels_last():
    torch.manual_seed(0)
    plain = models.get_net("lighthrnet.HRNet16", has_edge=True).eval()
    nhwc = models.get_net("lighthrnet.HRNet16", has_edge=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    acc.place_model(nhwc, torch.device("cpu"), channels_last=True)
    convs = [m.weight for m in nhwc.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        a = plain(x)
        b = nhwc(acc.to_device_images(x, torch.device("cpu"), channels_last=True))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


def test_compile_wraps_and_checkpoints_stay_plain():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    assert acc.compile_model(net, "off") is net
    compiled = acc.compile_model(net, "eager")
    assert acc.is_compiled(compiled) and acc.unwrap(compiled) is net
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert list(acc.plain_state_dict(compiled)) == list(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(compiled(x), net(x))
    with pytest.raises(ValueError, match="compile"):
        acc.compile_mode("fast")
    assert acc.compile_mode(True) == "on" and acc.compile_mode("false") == "off"


def test_pad_batch_repeats_the_last_image():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    padded = acc.pad_batch(x, 4)
    assert padded.shape == (4, 3, 2, 2) and torch.equal(padded[:2], x) and torch.equal(padded[3], x[1])
    assert acc.pad_batch(x, 2) is x


def test_cuda_overrides_apply_only_on_cuda_and_the_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {batch_size: 8}\ncuda_overrides: [train.batch_size=32, optim.lr=0.06]\n")
    cpu = load_run_config([str(path)], [], schema=ExperimentConfig, cuda=False)
    assert cpu.train.batch_size == 8 and cpu.optim.lr == ExperimentConfig().optim.lr
    gpu = load_run_config([str(path)], [], schema=ExperimentConfig, cuda=True)
    assert gpu.train.batch_size == 32 and gpu.optim.lr == 0.06
    explicit = load_run_config([str(path)], ["train.batch_size=4"], schema=ExperimentConfig, cuda=True)
    assert explicit.train.batch_size == 4 and explicit.optim.lr == 0.06
    off = load_run_config([str(path)], ["cuda_overrides=[]"], schema=ExperimentConfig, cuda=True)
    assert off.train.batch_size == 8
    assert will_use_cuda("cuda") and not will_use_cuda("cpu")
    assert will_use_cuda("auto") == torch.cuda.is_available()


@pytest.mark.parametrize("name, schema", [("synthetic", ExperimentConfig), ("synthetic_regressor", RegressorConfig)])
def test_main_job_keeps_its_cpu_recipe_and_grows_batches_on_cuda(name, schema):
    cpu = load_run_config([f"configs/{name}.yaml"], [], schema=schema, cuda=False)
    gpu = load_run_config([f"configs/{name}.yaml"], [], schema=schema, cuda=True)
    if schema is ExperimentConfig:
        assert (cpu.train.batch_size, cpu.train.epochs, cpu.optim.optimizer, cpu.optim.lr, cpu.data.num_workers) == \
            (8, 120, "adamw", 1e-3, 2)
        assert gpu.train.batch_size > cpu.train.batch_size
        assert gpu.train.batch_size * gpu.train.epochs >= cpu.train.batch_size * cpu.train.epochs  # work kept
        steps = [c.train.epochs * (c.data.synthetic.train // c.train.batch_size) for c in (cpu, gpu)]
        assert steps == [1440, 1440]  # the same steps, 4x the crops each
    else:
        assert (cpu.train.images_per_batch, cpu.train.steps, cpu.data.num_workers, cpu.tiles.warps_per_tile) == \
            (16, 8000, 0, 2)
        assert gpu.tiles.warps_per_tile == cpu.tiles.warps_per_tile
        assert gpu.train.images_per_batch > cpu.train.images_per_batch and gpu.train.steps < cpu.train.steps
        assert gpu.train.images_per_batch * gpu.train.steps >= cpu.train.images_per_batch * cpu.train.steps


def test_the_main_jobs_cuda_recipes_fit_its_dataset():
    """Each CUDA batch must fit the main job's synthetic train split (the loaders drop the last,
    short batch and refuse a split smaller than one batch): the regressor's first CUDA recipe
    asked for 256 crops of a 100-image split and would have stopped the main job on any GPU."""
    main = load_run_config(["configs/synthetic.yaml"], [], schema=ExperimentConfig, cuda=True)
    regressor = load_run_config(["configs/synthetic_regressor.yaml"], [], schema=RegressorConfig, cuda=True)
    train_images = main.data.synthetic.train
    assert main.train.batch_size <= train_images
    assert regressor.train.images_per_batch <= train_images


def test_eval_autocast_auto_is_fp32_on_cuda_unless_measured_faster(monkeypatch):
    assert acc.resolve_eval_amp("auto", torch.device("cpu"), "ocrnet.AuxHRNet") is None
    assert acc.resolve_eval_amp("auto", torch.device("cuda"), "ocrnet.AuxHRNet") is None
    monkeypatch.setitem(acc.EVAL_BF16_AUTO, "ocrnet.AuxHRNet", True)
    assert acc.resolve_eval_amp("auto", torch.device("cuda"), "ocrnet.AuxHRNet") == torch.bfloat16
    assert acc.resolve_eval_amp("bf16", torch.device("cpu"), "x") == torch.bfloat16
    assert acc.resolve_eval_amp("off", torch.device("cuda"), "x") is None


def test_background_writer_runs_jobs_in_order_and_waits():
    done = []
    writer = BackgroundWriter(max_pending=2)
    main = threading.get_ident()
    for i in range(6):
        writer.submit(lambda i=i: (time.sleep(0.005), done.append((i, threading.get_ident() != main))))
    writer.close()
    assert done == [(i, True) for i in range(6)]
    assert to_host(torch.arange(3)).get().tolist() == [0, 1, 2]


def test_background_writer_reports_the_first_error():
    writer = BackgroundWriter()
    writer.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    time.sleep(0.05)
    with pytest.raises(OSError, match="disk full"):
        writer.submit(lambda: None)
    with pytest.raises(OSError, match="disk full"):
        writer.close()


class Recording(nn.Module):
    """A fixed random 1x1 segmenter with an edge output that records its input shapes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.seg, self.edge = nn.Conv2d(3, 19, 1), nn.Conv2d(3, 1, 1)
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return {"pred": self.seg(x) * 20, "edge_prob": torch.sigmoid(self.edge(x))}


def test_evaluate_batched_device_metrics_equal_the_numpy_oracle(tiny_cityscapes):
    from experiment.config import DataConfig

    dataset = val_dataset(DataConfig(dataset_dir=tiny_cityscapes), tiny_cityscapes)
    net = Recording()
    per_image = evaluate(net, eval_loader(dataset, 1, 0), torch.device("cpu"), progress=False)
    net.shapes.clear()
    batched = evaluate(net, eval_loader(dataset, 3, 0), torch.device("cpu"), progress=False, pad_to_batch=True)
    assert {s[0] for s in net.shapes} == {3}  # 4 images: the short last batch was padded to 3
    mbas, counts = [], 0
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            pred = net(sample["image"][None])["pred"].argmax(1)[0].numpy().astype(np.uint8)
            label = np.asarray(sample["label"]).astype(np.uint8)
            mbas.append(boundary_accuracy(pred, label))
            counts = counts + boundary_f_counts(pred, label, 19, 2)
    oracle = boundary_f_from_counts(counts)
    expected_mba = np.nanmean(mbas)
    for metrics in (per_image, batched):
        assert metrics["num_images"] == len(dataset)
        assert metrics["mba"] == pytest.approx(expected_mba, rel=1e-12)
        assert metrics["boundary_f"] == pytest.approx(oracle["boundary_f"], rel=1e-12)
        assert metrics["per_class_boundary_f"] == oracle["per_class_boundary_f"]
    assert batched["miou"] == per_image["miou"]


@pytest.mark.slow  # ~90 s on 2 CPU cores: dynamo traces HRNet-16 for training and for evaluation
def test_training_with_compile_saves_plain_checkpoints(tiny_cityscapes, regressor, tmp_path, monkeypatch):
    """train.compile (the cheap 'eager' backend here; inductor on a GPU) trains, validates and
    writes checkpoints that load into a plain model, with no `_orig_mod.` keys."""
    from test_experiment_train import config, overrides  # noqa: F401  (same small run as the train tests)
    from experiment.checkpoints import load_training_checkpoint
    from experiment.methods import train
    from utils import dist

    for key in dist.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    ctx = dist.init_distributed("cpu")
    cfg = config(tiny_cityscapes, tmp_path / "run", regressor, **{"train.compile": "eager", "train.max_iters": 3,
                                                                   "train.val_interval": 0})
    metrics, net = train(cfg, ctx)
    assert metrics["num_images"] == 4 and not acc.is_compiled(net)
    state = load_training_checkpoint(str(tmp_path / "run" / "last.pth"))["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    fresh = models.get_net("lighthrnet.HRNet16", has_edge=True)
    fresh.load_state_dict(state)  # strict


class Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.seg, self.edge = nn.Conv2d(3, 19, 1), nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return {"pred": self.seg(x) * 20, "edge_prob": torch.sigmoid(self.edge(x))}


def test_evaluate_a_compiled_model_pads_and_matches(tiny_cityscapes):
    from experiment.config import DataConfig

    dataset = val_dataset(DataConfig(dataset_dir=tiny_cityscapes), tiny_cityscapes)
    net = Segmenter()
    compiled = acc.compile_model(net, "eager")
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    a = evaluate(net, eval_loader(dataset, 3, 0), torch.device("cpu"), progress=False)
    b = evaluate(compiled, eval_loader(dataset, 3, 0), torch.device("cpu"), progress=False)
    for key in ("miou", "mba", "boundary_f", "num_images"):
        assert a[key] == b[key]
    assert counters["stats"]["unique_graphs"] == 1  # one shape: the short last batch was padded


@pytest.mark.slow  # dynamo traces three scales of HMS (slim trunk): minutes on 2 loaded CPU cores
def test_hms_multi_scale_eval_compiles_as_one_graph():
    """--compile covers HMS's hierarchical multi-scale inference: one graph, no breaks, same outputs."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = models.get_net("ocrnet.HRNet_Mscale", hrnet_base=16, has_edge=True, scales=(0.5, 1.0, 2.0)).eval()
    compiled = acc.compile_model(net, "eager")
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        expected, got = net(x), compiled(x)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


@pytest.mark.slow  # three short training runs: minutes on 2 CPU cores
def test_resume_with_persistent_workers_matches_an_in_process_run(tiny_cityscapes, regressor, tmp_path,
                                                                   monkeypatch):
    """Persistent loader workers (2) stopped mid-epoch and resumed give bit-identical weights to an
    uninterrupted run without workers, with class-uniform lists that change every epoch."""
    from test_experiment_train import config
    from experiment.methods import train
    from utils import dist

    for key in dist.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    ctx = dist.init_distributed("cpu")
    # a copy: class-uniform sampling writes its centroid cache into the dataset root
    tiny_cityscapes = shutil.copytree(tiny_cityscapes, tmp_path / "cityscapes")
    common = {"data.class_uniform_fraction": 0.5, "train.val_interval": 0, "train.max_iters": 7}
    _, straight = train(config(tiny_cityscapes, tmp_path / "a", regressor, **common), ctx)
    workers = {**common, "data.num_workers": 2}
    train(config(tiny_cityscapes, tmp_path / "b", regressor, **workers), ctx, stop_after=4)  # mid epoch 1
    _, resumed = train(config(tiny_cityscapes, tmp_path / "b", regressor, **workers), ctx, resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ----------------------------------------------------------------------------- one evaluation precision
def test_evaluation_amp_is_val_amp_for_the_models_arch(monkeypatch):
    from test_experiment_train import config

    cfg = config("data", "out", "regressor", **{"train.amp": "bf16", "val.amp": "auto"})
    assert acc.evaluation_amp(cfg, torch.device("cpu")) is None
    assert acc.evaluation_amp(cfg, torch.device("cuda")) is None  # fp32 on CUDA: bf16 was measured slower
    monkeypatch.setitem(acc.EVAL_BF16_AUTO, cfg.model.arch, True)
    assert acc.evaluation_amp(cfg, torch.device("cuda")) == torch.bfloat16
    cfg.val.amp = "off"
    assert acc.evaluation_amp(cfg, torch.device("cuda")) is None


class AutocastRecorder(nn.Module):
    """A 1x1 segmenter with an edge output that records the autocast dtype (None: off) of each forward."""
    hrnet_base = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.seg, self.edge = nn.Conv2d(3, 19, 1), nn.Conv2d(3, 1, 1)
        self.seen = set()

    def forward(self, x):
        self.seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return {"pred": self.seg(x), "edge_prob": torch.sigmoid(self.edge(x))}


def evaluated_in_training(cfg, ctx, net, tiny_cityscapes, tmp_path, monkeypatch):
    from experiment.methods.segmentation import build_task
    from experiment.runtime import Rank0Writer

    build_task(cfg, ctx).evaluate(net, 0, False, Rank0Writer("", False))


def evaluated_standalone(cfg, ctx, net, tiny_cityscapes, tmp_path, monkeypatch):
    from experiment import validation

    monkeypatch.setattr(validation, "load_model", lambda *args: net)
    cfg.output_dir = str(tmp_path / "validation")
    validation.validate(cfg, "model.pth", ctx, state={})


def evaluated_by_infer(cfg, ctx, net, tiny_cityscapes, tmp_path, monkeypatch):
    import glob

    from experiment import infer

    monkeypatch.setattr(infer, "load_model", lambda *args: net)
    cfg.output_dir = str(tmp_path / "infer")
    image = sorted(glob.glob(f"{tiny_cityscapes}/leftImg8bit/val/*/*.png"))[0]
    infer.run_inference(cfg, "model.pth", image, ctx, progress=False, state={})


def evaluated_by_nus(cfg, ctx, net, tiny_cityscapes, tmp_path, monkeypatch):
    from experiment.methods.nus import NUSExperimentConfig, seg_task_builder
    from experiment.runtime import Rank0Writer
    from test_nus_experiment import TINY
    from utils.config import load_config

    nus = load_config(NUSExperimentConfig, ["configs/synthetic_nus.yaml"],
                      TINY + [f"data.dataset_dir={tiny_cityscapes}", f"train.amp={cfg.train.amp}",
                              f"val.amp={cfg.val.amp}", "val.max_images=2"])
    seg_task_builder(None, (16, 16))(nus, ctx).evaluate(net, 0, False, Rank0Writer("", False))


@pytest.mark.parametrize("amps, expected", [(("bf16", "off"), None), (("off", "bf16"), torch.bfloat16)],
                         ids=["train-bf16", "val-bf16"])
@pytest.mark.parametrize("entry", [evaluated_in_training, evaluated_standalone, evaluated_by_infer, evaluated_by_nus],
                         ids=["in-training", "validation", "infer", "nus"])
def test_every_evaluation_autocasts_by_val_amp_never_train_amp(entry, amps, expected, tiny_cityscapes, regressor,
                                                               tmp_path, ctx, monkeypatch):
    from test_experiment_train import config

    cfg = config(tiny_cityscapes, tmp_path / "run", regressor, **{"train.amp": amps[0], "val.amp": amps[1],
                                                                   "val.max_images": 2,
                                                                   "data.class_uniform_fraction": 0.0})
    net = AutocastRecorder()
    entry(cfg, ctx, net, tiny_cityscapes, tmp_path, monkeypatch)
    assert net.seen == {expected}


def test_best_pth_is_chosen_on_the_numbers_a_standalone_validation_gives(tiny_cityscapes, regressor, tmp_path, ctx,
                                                                         capsys):
    """Trained in bf16 (train.amp), validated by val.amp (auto: fp32 here) both in training and
    by experiment.validation of best.pth: the same numbers."""
    import json

    from experiment import validation
    from experiment.checkpoints import load_training_checkpoint
    from experiment.methods import train
    from test_experiment_train import config

    run = tmp_path / "run"
    # class-uniform sampling off: it would write its centroid cache into the shared read-only fixture
    train(config(tiny_cityscapes, run, regressor, **{"train.amp": "bf16", "train.max_iters": 3,
                                                     "data.class_uniform_fraction": 0.0}), ctx)
    chosen = load_training_checkpoint(str(run / "best.pth"))["metrics"]
    validation.main(["--model_path", str(run / "best.pth"), "--dataset_dir", tiny_cityscapes, "--inverseform_path",
                     str(regressor), "--opt", "loss.inverseform_tile_factor=1", "--batch_size", "2", "--num_workers",
                     "0", "--output_dir", str(tmp_path / "validation")])
    standalone = json.loads((tmp_path / "validation" / "metrics.json").read_text())
    keys = ("miou", "per_class_iou", "pixel_acc", "mba", "boundary_f", "boundary_iou", "edge_f", "val_loss",
            "val_loss_parts", "num_images")
    assert {k: standalone[k] for k in keys} == {k: chosen[k] for k in keys}


# ----------------------------------------------------------------------------- channels_last everywhere
def conv_weights(net):
    return [m.weight for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]


def all_channels_last(net):
    """Whether every k x k convolution is in channels_last (a depthwise kernel, C x 1 x k x k, is in
    both layouts, so a model in NCHW with depthwise kernels gives False only as a whole)."""
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(net))


def test_infer_places_the_model_in_channels_last_where_the_device_asks(tmp_path, ctx, monkeypatch):
    import cv2

    from experiment import infer
    from synthetic_weights import synthetic_state_dict
    from utils.config import load_config

    net = models.get_net("lighthrnet.HRNet16", has_edge=True)
    net.load_state_dict(synthetic_state_dict(net.state_dict(), seed=11))
    torch.save({"state_dict": net.state_dict()}, tmp_path / "model.pth")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "image.png"), cv2.resize(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8), (160, 96)))
    placed = []
    load = infer.load_model
    monkeypatch.setattr(infer, "load_model", lambda *args: placed.append(load(*args)) or placed[-1])
    outputs = {}
    for channels_last in (False, True):
        monkeypatch.setattr(acc, "use_channels_last", lambda device, on=channels_last: on)
        cfg = load_config(ExperimentConfig, [], [f"output_dir={tmp_path / str(channels_last)}", "model.has_edge=true",
                                                 "model.arch=lighthrnet.HRNet16", "val.num_workers=0"])
        infer.run_inference(cfg, str(tmp_path / "model.pth"), str(tmp_path / "image.png"), ctx, progress=False)
        outputs[channels_last] = [cv2.imread(str(tmp_path / str(channels_last) / f"image_{kind}.png"),
                                             cv2.IMREAD_UNCHANGED).astype(int) for kind in ("labelIds", "edge")]
    assert all_channels_last(placed[1]) and not all_channels_last(placed[0])
    (labels, edges), (labels_cl, edges_cl) = outputs[False], outputs[True]
    assert (labels == labels_cl).mean() > 0.999 and np.abs(edges - edges_cl).max() <= 1


def test_nus_places_its_nets_in_channels_last_where_the_device_asks(tiny_cityscapes, tmp_path, ctx, monkeypatch):
    from experiment.comparisons import sampling
    from experiment.methods import RunOptions
    from experiment.methods.nus import NUSExperimentConfig, build_aux_net
    from test_nus_experiment import TINY
    from utils.config import load_config

    def nus_config(out, *extra):
        return load_config(NUSExperimentConfig, ["configs/synthetic_nus.yaml"],
                           TINY + [f"output_dir={out}", f"data.dataset_dir={tiny_cityscapes}", *extra])

    torch.save({"state_dict": build_aux_net(nus_config(tmp_path)).state_dict()}, tmp_path / "aux.pth")
    results = {}
    for channels_last in (False, True):
        monkeypatch.setattr(acc, "use_channels_last", lambda device, on=channels_last: on)
        cfg = nus_config(tmp_path / str(channels_last), f"nus.aux_checkpoint={tmp_path / 'aux.pth'}")
        aux, _ = sampling._auxiliary_net(cfg, ctx, RunOptions(), [(16, 16)])
        aux_layout = all_channels_last(aux)
        seg, metrics = sampling._segmentation_run(cfg, ctx, RunOptions(), aux, (16, 16))
        results[channels_last] = (aux_layout, all_channels_last(seg), metrics)
    assert [results[False][:2], results[True][:2]] == [(False, False), (True, True)]
    plain, nhwc = results[False][2], results[True][2]
    assert nhwc["miou"] == pytest.approx(plain["miou"], abs=1e-3)
