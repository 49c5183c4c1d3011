"""inverseform.loss against straightforward per-image implementations of the definitions."""
import ast
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import inverseform
from inverseform import (
    ImageWeightedCrossEntropy,
    InverseFormLoss,
    InverseNet,
    JointEdgeSegLoss,
    balanced_bce_with_logits,
    edge_attention_cross_entropy,
    image_to_tiles,
    tiles_to_image,
)
from sync_check import assert_no_host_sync

RTOL = 1e-5


# straightforward versions of the definitions (NOTES.md), one image / one tile at a time ------------
def ref_image_ce(logits, target, num_classes, ignore_index=255, batch_histogram=False):
    """Per-image loop: histc histogram, weights 1 + [h>0](1-h), nn.NLLLoss on log_softmax."""
    total = 0.0
    for i in range(logits.shape[0]):
        source = target if batch_histogram else target[i]
        hist = torch.histc(source.float(), bins=num_classes, min=0, max=num_classes)
        norm = hist / hist.sum()
        weight = (hist != 0).float() * (1 - norm) + 1
        nll = nn.NLLLoss(weight=weight, ignore_index=ignore_index)
        total = total + nll(F.log_softmax(logits[i:i + 1], dim=1), target[i:i + 1])
    return total


def ref_bce(logits, target):
    """Weights computed in numpy over the whole batch, as the reference's bce2d."""
    t = target.reshape(1, -1).float().numpy()
    pos, neg = t == 1, t == 0
    weight = np.zeros(t.shape, dtype=np.float32)
    weight[pos] = neg.sum() / (pos.sum() + neg.sum())
    weight[neg] = pos.sum() / (pos.sum() + neg.sum())
    return F.binary_cross_entropy_with_logits(logits.reshape(1, -1), torch.from_numpy(t),
                                              torch.from_numpy(weight), reduction="mean")


def ref_tiles_by_concatenation(x, tile, rows, cols):
    """The reference's loop: start from tile (0, 0), concatenate the others along the batch."""
    out = x[:, :, :tile, :tile]
    for i in range(rows):
        for j in range(cols):
            if i + j:
                out = torch.cat((out, x[:, :, tile * i:tile * (i + 1), tile * j:tile * (j + 1)]), dim=0)
    return out


def ref_inverseform(net, edge_logits, edge_target, tile_factor=3):
    t = net.tile_size
    size = (tile_factor * t, 2 * tile_factor * t)
    pred = F.interpolate(torch.sigmoid(edge_logits), size=size, mode="bilinear", align_corners=False)
    target = F.interpolate(edge_target.float(), size=size, mode="bilinear", align_corners=False)
    a = ref_tiles_by_concatenation(pred, t, tile_factor, 2 * tile_factor)
    b = ref_tiles_by_concatenation(target, t, tile_factor, 2 * tile_factor)
    params = net.fc(torch.cat([a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)], dim=1))
    return ((params * params).sum(dim=1) ** 0.5).mean()


# inputs ---------------------------------------------------------------------------------------
def make_batch(n, c=5, h=40, w=70, seed=0, ignore_fraction=0.1):
    g = torch.Generator().manual_seed(seed)
    seg_logits = torch.randn(n, c, h, w, generator=g) * 2
    edge_logits = torch.randn(n, 1, h, w, generator=g)
    blocks = torch.randint(0, c, (n, (h + 4) // 5, (w + 4) // 5), generator=g)
    seg_target = blocks.repeat_interleave(5, 1).repeat_interleave(5, 2)[:, :h, :w].contiguous()
    seg_target[torch.rand(n, h, w, generator=g) < ignore_fraction] = 255
    edge = torch.zeros(n, 1, h, w)
    edge[:, 0, 1:] += (seg_target[:, 1:] != seg_target[:, :-1]).float()
    edge[:, 0, :, 1:] += (seg_target[:, :, 1:] != seg_target[:, :, :-1]).float()
    return seg_logits, edge_logits, seg_target, (edge > 0).float()


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return InverseNet(16, 4, hidden=(32, 8))


def _close(a, b, rtol=RTOL):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               rtol=rtol, atol=1e-7)


# tiling ---------------------------------------------------------------------------------------
def test_tiling_equals_explicit_slicing():
    x = torch.randn(3, 2, 4 * 7, 5 * 7)
    tiles = image_to_tiles(x, 7)
    assert tiles.shape == (3 * 4 * 5, 2, 7, 7)
    for n in range(3):
        for r in range(4):
            for c in range(5):
                assert torch.equal(tiles[(n * 4 + r) * 5 + c], x[n, :, 7 * r:7 * (r + 1), 7 * c:7 * (c + 1)])
    assert torch.equal(tiles_to_image(tiles, 3, 4, 5), x)
    with pytest.raises(ValueError, match="whole number"):
        image_to_tiles(torch.zeros(1, 1, 10, 14), 7)


# InverseForm ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, h, w", [(1, 48, 96), (3, 37, 101)])   # the second is not a tile multiple
def test_inverseform_equals_concatenated_reference(small_net, n, h, w):
    _, edge_logits, _, edge_target = make_batch(n, h=h, w=w, seed=n)
    loss = InverseFormLoss(small_net)
    _close(loss(edge_logits, edge_target), ref_inverseform(small_net, edge_logits, edge_target))
    # per-tile distances equal the regressor on explicit slices
    d = loss.tile_distances(torch.sigmoid(edge_logits), edge_target)
    assert d.shape == (n, 3, 6)
    pred = F.interpolate(torch.sigmoid(edge_logits), size=(48, 96), mode="bilinear", align_corners=False)
    target = F.interpolate(edge_target, size=(48, 96), mode="bilinear", align_corners=False)
    for i in range(n):
        for r in range(3):
            for c in range(6):
                sl = (slice(i, i + 1), slice(None), slice(16 * r, 16 * (r + 1)), slice(16 * c, 16 * (c + 1)))
                expected = small_net(pred[sl], target[sl]).norm()
                _close(d[i, r, c], expected)


def test_inverseform_released_layout_gradients():
    torch.manual_seed(1)
    net = InverseNet(224, 4)                       # the released layout, random weights
    loss = InverseFormLoss(net)
    _, edge_logits, _, edge_target = make_batch(1, h=64, w=128, seed=5)
    logits = edge_logits.clone().requires_grad_(True)
    value = loss(logits, edge_target)
    _close(value, ref_inverseform(net, edge_logits, edge_target))
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_regressor_frozen_and_stays_in_eval(small_net):
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(1, 1, 1)
            self.inverseform = InverseFormLoss(small_net)

    parent = Parent().train()
    assert parent.head.training and parent.inverseform.training
    assert not parent.inverseform.regressor.training
    assert not any(p.requires_grad for p in parent.inverseform.regressor.parameters())
    _, edge_logits, _, edge_target = make_batch(2, seed=6)
    logits = edge_logits.clone().requires_grad_(True)
    value = parent.inverseform(parent.head(logits), edge_target)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert parent.head.weight.grad is not None
    assert all(p.grad is None for p in small_net.parameters())


def test_inverseform_distances_and_sizes(small_net):
    _, edge_logits, _, edge_target = make_batch(2, h=50, w=60, seed=7)
    for distance in ("euclidean", "normalised", "geodesic"):
        logits = edge_logits.clone().requires_grad_(True)
        value = InverseFormLoss(small_net, distance=distance)(logits, edge_target)
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    two = InverseFormLoss(small_net, tile_factor=2)
    assert two.resized_size == (32, 64) and two.grid == (2, 4)
    assert two.tile_distances(torch.rand(2, 50, 60), edge_target).shape == (2, 2, 4)
    assert InverseFormLoss(small_net, resized_size=(32, 80)).grid == (2, 5)
    with pytest.raises(ValueError, match="multiples"):
        InverseFormLoss(small_net, resized_size=(30, 64))
    with pytest.raises(ValueError, match="unknown distance"):
        InverseFormLoss(small_net, distance="l1")


def test_inverseform_identical_boundaries_score_below_shifted_ones_with_identity_regressor():
    """A regressor that outputs the difference of tile centroids scores identity pairs 0."""
    net = InverseNet(8, 2, hidden=(2,), parameterisation="shift")
    with torch.no_grad():
        coords = torch.arange(8.0).repeat(8)                      # x coordinate of each pixel
        w = torch.zeros(2, 128)
        w[0, :64], w[1, 64:] = coords, coords                     # sum x of each tile
        net.fc[0].weight.copy_(w)
        net.fc[0].bias.zero_()
        net.fc[2].weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        net.fc[2].bias.zero_()
    target = torch.zeros(1, 1, 24, 48)
    target[..., 3] = 1.0
    loss = InverseFormLoss(net)
    same = loss.tile_distances(target, target)
    shifted = loss.tile_distances(torch.roll(target, 1, dims=-1), target)
    assert same.max() == 0 and shifted.max() > 0


# cross-entropy, BCE, attention -----------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_image_weighted_ce_equals_per_image_loop(n):
    seg_logits, _, seg_target, _ = make_batch(n, seed=10 + n)
    _close(ImageWeightedCrossEntropy(5)(seg_logits, seg_target), ref_image_ce(seg_logits, seg_target, 5))
    # batch-level histogram: the reference's code path
    _close(ImageWeightedCrossEntropy(5, per_image_weights=False)(seg_logits, seg_target),
           ref_image_ce(seg_logits, seg_target, 5, batch_histogram=True))


def test_image_weighted_ce_gradient_matches_loop():
    seg_logits, _, seg_target, _ = make_batch(2, seed=12)
    a = seg_logits.clone().requires_grad_(True)
    b = seg_logits.clone().requires_grad_(True)
    ImageWeightedCrossEntropy(5)(a, seg_target).backward()
    ref_image_ce(b, seg_target, 5).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)


def test_pixel_nll_gradient():
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5))
    torch.testing.assert_close(inverseform.pixel_nll(logits, target),
                               F.cross_entropy(logits, target, reduction="none"))
    assert torch.autograd.gradcheck(inverseform.pixel_nll, (logits, target))


def test_empty_image_contributes_zero_not_nan():
    seg_logits, _, seg_target, _ = make_batch(3, seed=13)
    seg_target[1] = 255
    logits = seg_logits.clone().requires_grad_(True)
    value = ImageWeightedCrossEntropy(5)(logits, seg_target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().max() == 0
    keep = [0, 2]
    _close(value, ref_image_ce(seg_logits[keep], seg_target[keep], 5))


@pytest.mark.parametrize("n", [1, 3])
def test_balanced_bce_equals_numpy_weighting(n):
    _, edge_logits, _, edge_target = make_batch(n, seed=20 + n)
    edge_target[:, :, :3] = 255                       # ignored
    _close(balanced_bce_with_logits(edge_logits, edge_target), ref_bce(edge_logits, edge_target))
    _close(balanced_bce_with_logits(edge_logits, edge_target[:, 0].to(torch.uint8)),
           ref_bce(edge_logits, edge_target))
    all_ignored = torch.full_like(edge_target, 255)
    assert balanced_bce_with_logits(edge_logits, all_ignored) == 0


@pytest.mark.parametrize("n", [1, 3])
def test_edge_attention_equals_masked_loop(n):
    seg_logits, edge_logits, seg_target, _ = make_batch(n, seed=30 + n)
    masked = torch.where(edge_logits.max(1)[0] > 0.8, seg_target, torch.full_like(seg_target, 255))
    _close(edge_attention_cross_entropy(seg_logits, seg_target, edge_logits, num_classes=5),
           ref_image_ce(seg_logits, masked, 5))
    masked = torch.where(edge_logits.max(1)[0] > 0.2, seg_target, torch.full_like(seg_target, 255))
    _close(edge_attention_cross_entropy(seg_logits, seg_target, edge_logits, threshold=0.2, num_classes=5),
           ref_image_ce(seg_logits, masked, 5))


def test_edge_attention_by_hand():
    """Three pixels, edge outputs 0.7, 0.9 and 2.0 against the threshold 0.8 (the reference
    compares the edge output as given, here logits): the first pixel is left out, the two others
    weigh 1 + (1 - 1/2) each (half of the kept pixels per class), so the loss is the plain mean of
    their two negative log-likelihoods."""
    seg_logits = torch.tensor([[[[2.0, 0.5, 1.0]], [[0.0, 1.5, -1.0]]]])  # 1 x 2 classes x 1 x 3
    seg_target = torch.tensor([[[0, 1, 0]]])
    edge = torch.tensor([[[[0.7, 0.9, 2.0]]]])

    def nll(logits, cls):
        return math.log(sum(math.exp(v) for v in logits)) - logits[cls]

    expected = (nll([0.5, 1.5], 1) + nll([1.0, -1.0], 0)) / 2
    value = edge_attention_cross_entropy(seg_logits, seg_target, edge, num_classes=2)
    assert float(value) == pytest.approx(expected, rel=1e-6)
    # with sigmoid probabilities instead (0.67, 0.71, 0.88) only the last pixel would count
    only_last = nll([1.0, -1.0], 0)
    assert float(edge_attention_cross_entropy(seg_logits, seg_target, torch.sigmoid(edge), num_classes=2)) == \
        pytest.approx(only_last, rel=1e-6)


# joint loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_joint_loss_equals_straightforward_composition(small_net, n):
    seg_logits, edge_logits, seg_target, edge_target = make_batch(n, seed=40 + n)
    criterion = JointEdgeSegLoss(num_classes=5, inverseform=small_net)
    s = seg_logits.clone().requires_grad_(True)
    e = edge_logits.clone().requires_grad_(True)
    total, parts = criterion(s, e, seg_target, edge_target[:, 0].to(torch.uint8))
    masked = torch.where(edge_logits.max(1)[0] > 0.8, seg_target, torch.full_like(seg_target, 255))
    expected = {
        "seg": ref_image_ce(seg_logits, seg_target, 5),
        "edge_bce": ref_bce(edge_logits, edge_target),
        "edge_att": ref_image_ce(seg_logits, masked, 5),
        "inverseform": ref_inverseform(small_net, edge_logits, edge_target),
    }
    assert sorted(parts) == sorted(expected)
    for key, value in expected.items():
        _close(parts[key], value)
        assert parts[key].dim() == 0 and not parts[key].requires_grad
    _close(total, 1.0 * expected["seg"] + 0.3 * expected["edge_bce"] + 0.1 * expected["edge_att"]
           + 0.3 * expected["inverseform"])
    total.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0

    # reference gradient for the whole objective
    s2 = seg_logits.clone().requires_grad_(True)
    e2 = edge_logits.clone().requires_grad_(True)
    masked2 = torch.where(e2.detach().max(1)[0] > 0.8, seg_target, torch.full_like(seg_target, 255))
    ref_total = (ref_image_ce(s2, seg_target, 5) + 0.3 * ref_bce(e2, edge_target)
                 + 0.1 * ref_image_ce(s2, masked2, 5) + 0.3 * ref_inverseform(small_net, e2, edge_target))
    ref_total.backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(e.grad, e2.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("n", [1, 3])
def test_edge_reduction_sum_counts_the_edge_terms_per_image(small_net, n):
    seg_logits, edge_logits, seg_target, edge_target = make_batch(n, seed=60 + n)
    args = (seg_logits, edge_logits, seg_target, edge_target[:, 0].to(torch.uint8))
    mean_total, parts = JointEdgeSegLoss(num_classes=5, inverseform=small_net)(*args)
    sum_total, sum_parts = JointEdgeSegLoss(num_classes=5, inverseform=small_net, edge_reduction="sum")(*args)
    assert sum_parts.keys() == parts.keys() and all(torch.equal(parts[k], sum_parts[k]) for k in parts)
    _close(sum_total, parts["seg"] + 0.1 * parts["edge_att"] + n * (0.3 * parts["edge_bce"] + 0.3 * parts["inverseform"]))
    if n == 1:
        _close(sum_total, mean_total)
    with pytest.raises(ValueError, match="edge_reduction"):
        JointEdgeSegLoss(edge_reduction="batch")


def test_joint_loss_without_edges_and_without_inverseform():
    seg_logits, edge_logits, seg_target, edge_target = make_batch(2, seed=50)
    total, parts = JointEdgeSegLoss(num_classes=5, seg_weight=2.0)(seg_logits, None, seg_target)
    assert list(parts) == ["seg"]
    _close(total, 2.0 * ref_image_ce(seg_logits, seg_target, 5))
    total, parts = JointEdgeSegLoss(num_classes=5)(seg_logits, edge_logits, seg_target, edge_target)
    assert sorted(parts) == ["edge_att", "edge_bce", "seg"]


def test_joint_loss_accepts_a_regressor_path(small_net, tmp_path):
    path = tmp_path / "regressor.pth"
    inverseform.save_regressor(small_net, path, {"dataset": "test"})
    seg_logits, edge_logits, seg_target, edge_target = make_batch(1, seed=51)
    _, parts = JointEdgeSegLoss(num_classes=5, inverseform=str(path))(seg_logits, edge_logits, seg_target, edge_target)
    _close(parts["inverseform"], ref_inverseform(small_net, edge_logits, edge_target))


def test_bf16_autocast_computes_in_fp32(small_net):
    seg_logits, edge_logits, seg_target, edge_target = make_batch(2, seed=60)
    criterion = JointEdgeSegLoss(num_classes=5, inverseform=small_net)
    s16 = seg_logits.bfloat16().requires_grad_(True)
    e16 = edge_logits.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = criterion(s16, e16, seg_target, edge_target)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    total.backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()
    # exactly the fp32 computation on the bf16 values ...
    ref_total, ref_parts = criterion(s16.detach().float(), e16.detach().float(), seg_target, edge_target)
    for key in parts:
        _close(parts[key], ref_parts[key])
    # ... and close to the fp32 inputs' result
    fp32_total, _ = criterion(seg_logits, edge_logits, seg_target, edge_target)
    _close(total, fp32_total, rtol=2e-2)


# validation -----------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors(small_net):
    seg_logits, edge_logits, seg_target, edge_target = make_batch(2, seed=70)
    criterion = JointEdgeSegLoss(num_classes=5, inverseform=small_net)
    cases = [
        ((seg_logits[:, :4], edge_logits, seg_target, edge_target), "N x 5 x H x W"),
        ((seg_logits[0], edge_logits, seg_target, edge_target), "N x 5 x H x W"),
        ((seg_logits, edge_logits, seg_target[:1], edge_target), "seg_target must be 2 x 40 x 70"),
        ((seg_logits, edge_logits, seg_target[:, :30], edge_target), "seg_target must be 2 x 40 x 70"),
        ((seg_logits, edge_logits.expand(2, 2, 40, 70), seg_target, edge_target), "edge_logits must be N x 1"),
        ((seg_logits, edge_logits[:, :, :30], seg_target, edge_target), "edge_logits must have shape"),
        ((seg_logits, edge_logits, seg_target, edge_target[:1]), "edge_target must have shape"),
        ((seg_logits, edge_logits, seg_target, None), "edge_target is required"),
        ((seg_logits, edge_logits, seg_target.float().bool(), edge_target), "integer class ids"),
    ]
    for args, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            criterion(*args)
    bad = seg_logits.clone()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="seg_logits contains NaN or Inf"):
        criterion(bad, edge_logits, seg_target, edge_target)
    bad_edge = edge_logits.clone()
    bad_edge[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="edge_logits contains NaN or Inf"):
        criterion(seg_logits, bad_edge, seg_target, edge_target)
    labels = seg_target.clone()
    labels[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels outside \[0, 4\]"):
        criterion(seg_logits, edge_logits, labels, edge_target)
    unchecked = JointEdgeSegLoss(num_classes=5, inverseform=small_net, check_inputs=False)
    total, _ = unchecked(bad, edge_logits, seg_target, edge_target)   # no check, no error
    assert torch.isnan(total)
    loss = InverseFormLoss(small_net)
    with pytest.raises(ValueError, match="edge_logits contains NaN"):
        loss(bad_edge, edge_target)
    with pytest.raises(ValueError, match="2 maps but edge_target has 1"):
        loss(edge_logits, edge_target[:1])
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        loss(edge_logits.expand(2, 3, 40, 70), edge_target)
    with pytest.raises(TypeError, match="InverseNet or a checkpoint path"):
        InverseFormLoss(nn.Linear(2, 2))


def test_no_host_synchronisation_without_input_checks(small_net):
    """With check_inputs=False nothing reads a tensor on the host, in Python or inside an
    operator (an SVD's convergence check, a size that depends on the data)."""
    seg_logits, edge_logits, seg_target, edge_target = make_batch(2, seed=80)
    criterion = JointEdgeSegLoss(num_classes=5, inverseform=InverseFormLoss(small_net, distance="geodesic"),
                                 check_inputs=False)
    s = seg_logits.clone().requires_grad_(True)
    e = edge_logits.clone().requires_grad_(True)
    with assert_no_host_sync():
        total, _ = criterion(s, e, seg_target, edge_target)
        total.backward()
    assert torch.isfinite(total) and s.grad is not None


def test_package_imports_nothing_of_ours():
    root = pathlib.Path(inverseform.__file__).parent
    allowed = {"torch", "__future__", "contextlib", "functools", "hashlib", "io", "json", "math", "os", "re",
               "tempfile", "pathlib", "typing"}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:          # relative import inside the package
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_pixel_nll_in_row_blocks_on_a_cpu_equals_one_pass(monkeypatch):
    """On a CPU the forward runs over blocks of rows (no full log-probability tensor): the NLL
    and its gradient must be those of one log_softmax over the whole map (to float rounding:
    a block's vectorised softmax may round the last bit differently)."""
    import inverseform.loss as loss_module

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 23, 31, requires_grad=True)
    target = torch.randint(0, 7, (2, 23, 31))
    expected = -torch.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    monkeypatch.setattr(loss_module, "_CPU_CHUNK_ELEMENTS", 2 * 7 * 31 * 4)  # blocks of 4 rows, the last one 3
    nll = loss_module.pixel_nll(logits, target)
    torch.testing.assert_close(nll, expected.detach(), rtol=1e-6, atol=1e-6)
    grad = torch.autograd.grad(nll.square().sum(), logits)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), logits)[0], rtol=1e-6, atol=1e-7)
