"""--deterministic: strict deterministic algorithms with cuBLAS's setting, a one-line refusal of an
op without a deterministic implementation, and the replacements taken on CUDA in that mode
(utils/determinism.py, the plug-ins' own, the metrics' class counts), each equal on the CPU to
the fast op it replaces."""
import os

import pytest
import torch
import torch.nn.functional as F

from experiment import engine
from experiment.errors import UserError
from inverseform import tiling
from rloss import loss as rloss_loss
from utils import determinism
from utils.metrics import class_histogram, histogram_method

CUDA = torch.device("cuda")


@pytest.fixture
def restored(monkeypatch):
    """Leaves determinism as it found it (the engine sets process-wide state)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    cudnn.deterministic, cudnn.benchmark = before[2], before[3]


# ----------------------------------------------------------------------------- the engine
def train_config(tiny_cityscapes, out, regressor, **extra):
    from test_experiment_train import config

    return config(tiny_cityscapes, out, regressor, **{"train.deterministic": "true", "train.max_iters": 2,
                                                      "train.val_interval": 0, "data.class_uniform_fraction": 0.0,
                                                      **extra})


def test_deterministic_training_is_strict_and_runs_on_the_cpu(tiny_cityscapes, regressor, tmp_path, ctx, restored):
    from experiment.methods import train

    metrics, _ = train(train_config(tiny_cityscapes, tmp_path / "run", regressor), ctx)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert 0 <= metrics["miou"] <= 1 and metrics["num_images"] == 4


def weak_run(tiny_cityscapes, out):
    from experiment.run_config import load_run_config

    opts = {"output_dir": out, "data.dataset_dir": tiny_cityscapes, "data.crop_size": "[64, 128]",
            "data.class_uniform_fraction": 0.0, "data.num_workers": 0, "model.arch": "lighthrnet.HRNet16",
            "model.has_edge": "false", "weak.enabled": "true", "weak.min_area": 10, "train.max_iters": 2,
            "train.batch_size": 2, "train.val_interval": 0, "train.device": "cpu", "train.amp": "off",
            "train.deterministic": "true", "val.batch_size": 2, "val.num_workers": 0}
    return load_run_config([], [f"{k}={v}" for k, v in opts.items()])


def nus_run(tiny_cityscapes, out):
    from experiment.methods.nus import NUSExperimentConfig
    from test_nus_experiment import TINY
    from utils.config import load_config

    return load_config(NUSExperimentConfig, ["configs/synthetic_nus.yaml"],
                       TINY + [f"output_dir={out}", f"data.dataset_dir={tiny_cityscapes}", "train.deterministic=true"])


@pytest.mark.parametrize("make", [weak_run, nus_run], ids=["weak", "nus"])
def test_the_other_methods_train_in_strict_deterministic_mode_on_the_cpu(make, tiny_cityscapes, tmp_path, ctx,
                                                                        restored):
    """The DenseCRF loss (its downscaled softmax) and NUS (the auxiliary net, sampling,
    un-sampling, uniform and adaptive) run strictly."""
    from experiment.methods import run

    result = run(make(tiny_cityscapes, tmp_path / "run"), ctx)
    metrics = result[0] if isinstance(result, tuple) else result
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    scores = [value for key, value in metrics.items() if key.endswith("miou")]
    assert scores and all(0 <= value <= 1 for value in scores)


def test_an_op_without_a_deterministic_implementation_is_refused_in_one_line(tiny_cityscapes, regressor, tmp_path,
                                                                             ctx, restored):
    from experiment.methods.segmentation import build_task

    def build(cfg, ctx):
        task = build_task(cfg, ctx)
        step = task.step

        def unpooling_step(model, batch, info):
            loss, parts, out = step(model, batch, info)
            pooled, index = F.max_pool2d(out["pred"], 2, return_indices=True)
            return loss + F.max_unpool2d(pooled, index, 2).mean(), parts, out

        task.step = unpooling_step
        return task

    with pytest.raises(UserError) as error:
        engine.fit(train_config(tiny_cityscapes, tmp_path / "run", regressor), ctx, build)
    message = str(error.value)
    assert "max_unpooling2d_forward_out has no deterministic implementation" in message
    assert "--deterministic" in message and "\n" not in message


def test_other_errors_pass_unchanged():
    with pytest.raises(RuntimeError, match="^boom$"):
        with engine.refusing_nondeterministic_ops(True):
            raise RuntimeError("boom")
    text = "put_ does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms(True)'"
    with pytest.raises(RuntimeError, match="put_ does not"):  # not asked for: PyTorch's own error
        with engine.refusing_nondeterministic_ops(False):
            raise RuntimeError(text)
    cublas = engine.nondeterminism_message("... you must set CUBLAS_WORKSPACE_CONFIG=:4096:8 or ...")
    assert "export CUBLAS_WORKSPACE_CONFIG=:4096:8" in cublas


def test_cublas_setting_is_set_before_cuda_and_refused_after(monkeypatch, restored):
    engine.set_deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # PyTorch's other deterministic setting: kept
    engine.set_deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    engine.set_deterministic_cublas()  # a deterministic value: nothing to refuse
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(UserError, match=r"CUDA was started with ':0:0'; export CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        engine.set_deterministic_cublas()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    with pytest.raises(UserError, match="started with it unset"):
        engine.set_deterministic_cublas()


def test_the_scripts_set_cublas_at_config_load(tiny_cityscapes, regressor, tmp_path, monkeypatch, restored):
    from experiment import cli
    from test_experiment_train import config

    seen = {}

    def stop(device):
        seen["cublas"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        raise SystemExit(0)

    monkeypatch.setattr(cli.dist, "init_distributed", stop)  # where CUDA would start
    cfg = config(tiny_cityscapes, tmp_path, regressor, **{"train.deterministic": "true"})
    with pytest.raises(SystemExit):
        cli.script_main(None, lambda args: cfg, lambda cfg, ctx: None, "log.txt")
    assert seen["cublas"] == ":4096:8"


# ----------------------------------------------------------------------------- the replacements
def test_replacements_are_taken_on_cuda_in_deterministic_mode_only(restored):
    torch.use_deterministic_algorithms(False)
    assert not determinism.replacing(CUDA) and histogram_method(CUDA) == "histc"
    torch.use_deterministic_algorithms(True)
    assert determinism.replacing(CUDA) and histogram_method(CUDA) == "scatter"
    assert not determinism.replacing(torch.device("cpu")) and histogram_method(torch.device("cpu")) == "scatter"


def test_class_histogram_by_scatter_equals_histc():
    labels = torch.randint(-3, 25, (3, 57, 91), generator=torch.Generator().manual_seed(0))
    fast = class_histogram(labels, 19, method="histc")
    assert torch.equal(class_histogram(labels, 19, method="scatter"), fast)
    valid = labels[(labels >= 0) & (labels < 19)]
    assert torch.equal(fast, torch.bincount(valid, minlength=19))


RESIZES = [((2, 3, 8, 16), (16, 32), None, False), ((2, 3, 8, 16), (16, 32), None, True),
           ((1, 2, 7, 9), (20, 33), None, False), ((1, 2, 20, 30), (7, 11), None, True),
           ((2, 2, 10, 12), None, 0.5, False), ((2, 2, 10, 12), None, 1.7, False),
           ((2, 2, 10, 12), None, (2.0, 0.75), False)]


def fast_and_replaced(resize, shape, size, scale, align_corners, seed=0):
    """(output, input gradient) of F.interpolate and of ``resize`` for the same input and gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    results = []
    for fn in (lambda t: F.interpolate(t, size=size, scale_factor=scale, mode="bilinear",
                                       align_corners=align_corners), resize):
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.backward(torch.randint(-4, 5, out.shape, generator=torch.Generator().manual_seed(1)).float())
        results.append((out.detach(), leaf.grad))
    return results


@pytest.mark.parametrize("shape, size, scale, align_corners", RESIZES)
def test_bilinear_replacement_equals_interpolate(shape, size, scale, align_corners):
    def replaced(t):
        return determinism.bilinear_matmul_backward(t, size, scale, align_corners)

    (out, grad), (out_r, grad_r) = fast_and_replaced(replaced, shape, size, scale, align_corners)
    assert torch.equal(out_r, out)  # the forward is F.interpolate's own
    torch.testing.assert_close(grad_r, grad)


def test_bilinear_replacement_backward_is_exact_on_dyadic_weights():
    """x2 upsampling weighs 1/4 and 3/4: integer gradients sum exactly in both."""
    for replaced in (lambda t: determinism.bilinear_matmul_backward(t, (16, 32)),
                     lambda t: tiling._DeterministicResize.apply(t, (16, 32))):
        (out, grad), (out_r, grad_r) = fast_and_replaced(replaced, (2, 3, 8, 16), (16, 32), None, False)
        assert torch.equal(out_r, out) and torch.equal(grad_r, grad)
    (out, grad), (out_r, grad_r) = fast_and_replaced(lambda t: rloss_loss._DeterministicResize.apply(t, 0.5),
                                                     (2, 3, 8, 16), None, 0.5, False)
    assert torch.equal(out_r, out) and torch.equal(grad_r, grad)


@pytest.mark.parametrize("shape, size, scale, align_corners", RESIZES)
def test_output_size_is_interpolates(shape, size, scale, align_corners):
    x = torch.zeros(shape)
    out = F.interpolate(x, size=size, scale_factor=scale, mode="bilinear", align_corners=align_corners)
    assert determinism.output_size(x, size, scale) == tuple(out.shape[-2:])


def test_the_cpu_takes_the_matmul_backward_where_its_products_are_small():
    logits = torch.zeros(8, 19, 16, 32, requires_grad=True)    # HRNet's stride-8 logits of a 128 x 256 crop
    full_size = torch.zeros(1, 19, 256, 512, requires_grad=True)  # stride 4 of a 1024 x 2048 image
    assert determinism.takes_matmul_backward(logits, (128, 256))
    assert determinism.takes_matmul_backward(logits, None, 8.0)
    assert not determinism.takes_matmul_backward(full_size, (1024, 2048))
    assert not determinism.takes_matmul_backward(logits.detach(), (128, 256))
    with torch.no_grad():
        assert not determinism.takes_matmul_backward(logits, (128, 256))
    # the cost per output at measured points (docs/benchmarks.md): 34 and 66 faster, 576 and 384 slower
    assert determinism.matmul_backward_pays_on_cpu((16, 32), (128, 256))
    assert determinism.matmul_backward_pays_on_cpu((32, 64), (512, 1024))
    assert not determinism.matmul_backward_pays_on_cpu((256, 512), (1024, 2048))
    assert not determinism.matmul_backward_pays_on_cpu((128, 256), (128, 256))


@pytest.mark.parametrize("shape, size, scale, align_corners",
                         RESIZES + [((2, 3, 16, 32), (128, 256), None, False),
                                    ((1, 2, 64, 320), (64, 320), None, False)])  # ATen's backward: cost 384
def test_interpolate_bilinear_on_the_cpu_equals_interpolate(shape, size, scale, align_corners):
    """Either backward the dispatch takes: the forward bit for bit, the gradient up to the sums' order."""
    (out, grad), (out_r, grad_r) = fast_and_replaced(
        lambda t: determinism.interpolate_bilinear(t, size, scale, align_corners), shape, size, scale, align_corners)
    assert torch.equal(out_r, out)
    torch.testing.assert_close(grad_r, grad)


@pytest.mark.parametrize("size", [(20, 33), (7, 11)])
def test_inverseform_tiling_replacement_equals_interpolate(size):
    (out, grad), (out_r, grad_r) = fast_and_replaced(lambda t: tiling._DeterministicResize.apply(t, size),
                                                     (1, 1, 12, 24), size, None, False)
    assert torch.equal(out_r, out)
    torch.testing.assert_close(grad_r, grad)


@pytest.mark.parametrize("scale", [0.5, 0.3, 1.5])
def test_rloss_resize_replacement_equals_interpolate(scale):
    (out, grad), (out_r, grad_r) = fast_and_replaced(lambda t: rloss_loss._DeterministicResize.apply(t, scale),
                                                     (2, 4, 18, 26), None, scale, False)
    assert torch.equal(out_r, out)
    torch.testing.assert_close(grad_r, grad)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_summed_cross_entropy_equals_cross_entropy(reduction):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 9, 11, generator=gen)
    target = torch.randint(0, 5, (2, 9, 11), generator=gen)
    target[0, :4] = 255
    grads = []
    for fn in (F.cross_entropy, determinism.summed_cross_entropy):
        leaf = logits.clone().requires_grad_()
        value = fn(leaf, target, ignore_index=255, reduction=reduction)
        value.backward()
        grads.append((value.detach(), leaf.grad))
    torch.testing.assert_close(grads[1], grads[0])
    ignored = torch.full_like(target, 255)
    assert determinism.summed_cross_entropy(logits, ignored, 255, reduction).isnan() == \
        F.cross_entropy(logits, ignored, ignore_index=255, reduction=reduction).isnan()
