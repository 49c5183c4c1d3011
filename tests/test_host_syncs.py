"""Host synchronisations in the training and evaluation hot paths, checked on a CPU by what the
code dispatches (tests/sync_check.py): none in the losses, the training objective, the edge F
counts and the SO(3) projection; one in the DenseCRF lattice, two in the NUS un-sampler
(docs/gpu.md, "Host syncs")."""
import numpy as np
import pytest
import torch

import rloss.lattice
from experiment.config import LossConfig
from experiment.methods.segmentation import SegmentationObjective
from inverseform import InverseFormLoss, InverseNet, JointEdgeSegLoss
from inverseform.distances import geodesic_distance, so3_projection
from models import get_net
from models.nus import unsample, uniform_grid
from rloss import PermutohedralLattice, lattice_features
from sync_check import HostSyncError, assert_no_host_sync, recorded_host_syncs
from utils.metrics import edge_f_counts, edge_f_counts_batch


# ----------------------------------------------------------------------------- the checker
def _assign_scalar(x):
    x[0, 0] = 1.0


SYNCING = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool(x.sum() > 0),
    "tolist": lambda x: x.tolist(),
    "cpu": lambda x: x.cpu(),
    "nonzero": torch.nonzero,
    "where(cond)": lambda x: torch.where(x > 0),
    "boolean mask": lambda x: x[x > 0],
    "bincount": lambda x: torch.bincount((x > 0).long().flatten()),
    "unique": torch.unique,
    "repeat_interleave": lambda x: torch.repeat_interleave(torch.ones(3, dtype=torch.long)),
    "svd": torch.linalg.svd,
    "eigh": lambda x: torch.linalg.eigh(x @ x.mT),
    "solve": lambda x: torch.linalg.solve(x + 4 * torch.eye(4), x),
    "inv_ex checked": lambda x: torch.linalg.inv_ex(x + 4 * torch.eye(4), check_errors=True),
    "histc without range": lambda x: torch.histc(x, 10),
    "host data to a device": lambda x: torch.tensor([1.0, 2.0], device=x.device),
}
SYNC_FREE = {
    "scatter_add": lambda x: torch.zeros(3).scatter_add_(0, (x > 0).long().flatten(), x.flatten()),
    "repeat_interleave with its size": lambda x: torch.repeat_interleave(torch.ones(3, dtype=torch.long),
                                                                        output_size=3),
    "inv_ex": lambda x: torch.linalg.inv_ex(x + 4 * torch.eye(4)),
    "histc with a range": lambda x: torch.histc(x, 10, -3.0, 3.0),
    "a scalar assigned": _assign_scalar,
    "masked_fill": lambda x: x.masked_fill(x > 0, 0.0),
    "host constants": lambda x: torch.tensor([1.0, 2.0]),
}


@pytest.mark.parametrize("name", sorted(SYNCING))
def test_checker_catches_each_kind_of_host_sync(name):
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(HostSyncError):
        with assert_no_host_sync():
            SYNCING[name](x)


def test_checker_passes_device_side_code_and_restores_torch():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    with assert_no_host_sync():
        for fn in SYNC_FREE.values():
            fn(x)
    assert x.tolist() and torch.tensor([1.0], device="cpu").item() == 1.0  # patches undone


# ----------------------------------------------------------------------------- losses
@pytest.fixture(scope="module")
def regressors():
    torch.manual_seed(0)
    return {"released": InverseNet(16, 4, hidden=(32, 8)),
            "affine": InverseNet(16, 6, hidden=(32, 8), parameterisation="affine")}


@pytest.mark.parametrize("parameterisation", ["released", "affine"])
@pytest.mark.parametrize("distance", ["euclidean", "normalised", "geodesic"])
def test_inverseform_loss_forward_and_backward_are_sync_free(regressors, parameterisation, distance):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 40, 70, generator=g, requires_grad=True)
    target = (torch.rand(2, 1, 40, 70, generator=g) > 0.8).float()
    loss = InverseFormLoss(regressors[parameterisation], distance=distance, check_inputs=False)
    with assert_no_host_sync():
        loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all()


def test_so3_projection_and_geodesic_distance_are_sync_free():
    g = torch.Generator().manual_seed(2)
    m = (torch.eye(3) + 0.3 * torch.randn(16, 3, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    with assert_no_host_sync():
        (so3_projection(m).sum() + geodesic_distance(m).sum()).backward()
    assert torch.isfinite(m.grad).all()


def test_training_objective_with_its_model_is_sync_free(regressors):
    """One HMS training step's forward and backward: the model and the four joint losses (main,
    aux, both scales), each with its geodesic InverseForm term."""
    torch.manual_seed(3)
    net = get_net("ocrnet.HRNet_Mscale", num_classes=5, has_edge=True, hrnet_base=16).train()
    inverseform = InverseFormLoss(regressors["released"], tile_factor=1, distance="geodesic", check_inputs=False)
    objective = SegmentationObjective(LossConfig(), 5, inverseform)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 32, 64, generator=g)
    label = torch.randint(0, 5, (2, 32, 64), generator=g)
    edge = (torch.rand(2, 1, 32, 64, generator=g) > 0.8).float()
    with assert_no_host_sync():
        outputs = net(images)
        total, _ = objective(outputs, label, edge)
        total.backward()
    assert {"pred_05x", "pred_10x", "aux"} <= set(outputs) and torch.isfinite(total)


def test_joint_loss_reads_the_host_only_for_its_input_check(regressors):
    g = torch.Generator().manual_seed(5)
    seg, edge = torch.randn(2, 5, 24, 48, generator=g), torch.randn(2, 1, 24, 48, generator=g)
    label, edge_t = torch.randint(0, 5, (2, 24, 48), generator=g), (torch.rand(2, 1, 24, 48, generator=g) > 0.8).float()
    checked = JointEdgeSegLoss(5, inverseform=InverseFormLoss(regressors["released"], tile_factor=1))
    with recorded_host_syncs() as found:
        checked(seg, edge, label, edge_t)
    assert len(found) == 1  # the one read of all the input checks together


# ----------------------------------------------------------------------------- edge F
def _edge_maps(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    prob = torch.nn.functional.avg_pool2d(torch.rand(n, 1, h, w, generator=g), 3, 1, 1)[:, 0]
    prob[:, :2] = torch.tensor([0.0, 1.0])[torch.randint(0, 2, (n, 2, w), generator=g)]  # 0 and 1 exactly
    target = (torch.rand(n, h, w, generator=g) > 0.85).float()
    return prob, target


@pytest.mark.parametrize("tolerance", [0, 2, 3])
def test_edge_f_device_counts_equal_bincount_and_the_oracle_exactly(tolerance):
    for seed in range(4):
        prob, target = _edge_maps(3, 23, 41, seed)
        counted = edge_f_counts_batch(prob, target, tolerance, host=True)
        device = edge_f_counts_batch(prob, target, tolerance, host=False)
        assert device.dtype == torch.int64 and torch.equal(device, counted)
        oracle = sum(edge_f_counts(p.numpy(), t.numpy(), tolerance) for p, t in zip(prob, target))
        np.testing.assert_array_equal(device.numpy(), oracle)


def test_edge_f_device_counts_are_sync_free():
    prob, target = _edge_maps(2, 40, 70, 9)
    with assert_no_host_sync():
        edge_f_counts_batch(prob, target, host=False)


# ----------------------------------------------------------------------------- DenseCRF lattice
def _features(n, h, w, sigma_rgb, sigma_xy, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.avg_pool2d(torch.rand(n, 3, h, w, generator=g) * 255, 3, 1, 1)
    return lattice_features(image, sigma_rgb, sigma_xy)


def _as_on_a_gpu(monkeypatch):
    """The lattice as built where reading a tensor waits for the device."""
    monkeypatch.setattr(rloss.lattice, "_host_reads_are_free", lambda device: False)


@pytest.mark.parametrize("sigmas", [(15.0, 8.0), (0.5, 0.3)])  # int32 codes on a CPU; int64 (finer)
@pytest.mark.parametrize("sse_padding", [True, False])
def test_lattice_reads_the_host_once_and_equals_the_cpu_build(monkeypatch, sigmas, sse_padding):
    features = _features(3, 13, 15, *sigmas, seed=10)
    values = torch.rand(3, 13 * 15, 4, generator=torch.Generator().manual_seed(11))
    cpu = PermutohedralLattice(features, sse_padding)
    _as_on_a_gpu(monkeypatch)
    with recorded_host_syncs() as found:
        lattice = PermutohedralLattice(features, sse_padding)
        out = lattice.apply(values)
    assert found == ["Tensor.tolist(): a tensor read on the host"]  # the vertex count
    assert lattice.num_vertices == cpu.num_vertices and torch.equal(out, cpu.apply(values))


def test_too_fine_lattice_is_refused_after_its_one_read(monkeypatch):
    features = _features(1, 64, 64, 0.002, 0.002, seed=12)
    with pytest.raises(ValueError, match="too fine"):
        PermutohedralLattice(features)
    _as_on_a_gpu(monkeypatch)
    with pytest.raises(ValueError, match="too fine"):
        PermutohedralLattice(features)


# ----------------------------------------------------------------------------- NUS un-sampler
def test_unsample_reads_the_host_twice_on_an_unfolded_grid():
    g = torch.Generator().manual_seed(13)
    grid = uniform_grid((9, 17)).unsqueeze(0).expand(2, 9, 17, 2)
    locations = (grid + 0.01 * torch.randn(2, 9, 17, 2, generator=g)).clamp(0, 1)
    logits = torch.randn(2, 5, 9, 17, generator=g, requires_grad=True)
    with recorded_host_syncs() as found:
        out = unsample(logits, locations, (40, 70))
        out.sum().backward()
    assert len(found) == 2, found  # fold flag with the crossings' count; every pixel found its triangle
    assert out.shape == (2, 5, 40, 70) and torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------- the engine and evaluation
def test_the_finite_check_reads_the_host_once():
    from experiment.engine import check_finite

    losses = {"total": torch.tensor(1.0), "seg": torch.tensor(0.5)}
    with recorded_host_syncs() as found:
        assert check_finite(losses, 3, 0, "last.pth", stop_requested=True) is True
    assert len(found) == 1, found  # the flags' read, nothing to make them


def test_the_validation_loss_and_image_logging_are_sync_free():
    from experiment.evaluation import per_image_loss_sums
    from experiment.pictures import unnormalize

    torch.manual_seed(0)
    logits, edge_logits = torch.randn(2, 19, 16, 32), torch.randn(2, 1, 16, 32)
    labels, edges = torch.randint(0, 19, (2, 16, 32)), (torch.rand(2, 1, 16, 32) > 0.8).float()
    criterion = JointEdgeSegLoss(num_classes=19, check_inputs=False)
    with assert_no_host_sync():
        sums, present = per_image_loss_sums(criterion, logits, edge_logits, labels, edges)
        pictures = unnormalize(torch.randn(2, 3, 8, 8))
    assert present.sum() > 0 and torch.isfinite(sums).all() and pictures.shape == (2, 3, 8, 8)
