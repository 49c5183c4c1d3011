"""Reliability of the loss plug-in: its's input rules (edge targets 0/1/ignore, shared by
BCE and InverseForm; empty batches; float labels)."""
import pytest
import torch

from inverseform import InverseFormLoss, InverseNet, JointEdgeSegLoss


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return InverseNet(16, 4, hidden=(32, 8))


def batch(n=2, h=32, w=64, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randn(n, c, h, w, generator=g)
    edge = torch.randn(n, 1, h, w, generator=g) * 3
    labels = torch.randint(0, c, (n, h, w), generator=g)
    target = (torch.rand(n, 1, h, w, generator=g) < 0.2).float()
    return seg, edge, labels, target


def test_ignored_edge_pixels_are_left_out_of_both_inverseform_maps(net):
    _, edge, _, target = batch()
    region = torch.zeros_like(target, dtype=torch.bool)
    region[:, :, :10, :20] = True
    loss = InverseFormLoss(net, tile_factor=1)
    ignored = loss(edge, torch.where(region, torch.full_like(target, 255), target))
    # ignoring a region = neither map has a boundary there (sigmoid(-200) is exactly 0 in fp32)
    blanked = loss(torch.where(region, torch.full_like(edge, -200.0), edge), torch.where(region, 0.0, target))
    torch.testing.assert_close(ignored, blanked)
    assert ignored < 10  # a 255 read as a boundary strength gave values two orders of magnitude off
    assert not torch.isclose(ignored, loss(edge, target))


def test_joint_loss_feeds_inverseform_the_same_ignore_rule(net):
    seg, edge, labels, target = batch(seed=1)
    target[:, :, 5:9] = 255
    joint = JointEdgeSegLoss(num_classes=5, inverseform=InverseFormLoss(net, tile_factor=1))
    _, parts = joint(seg, edge, labels, target)
    torch.testing.assert_close(parts["inverseform"], InverseFormLoss(net, tile_factor=1)(edge, target))


@pytest.mark.parametrize("value", [7.0, 0.5, -1.0])
def test_edge_targets_outside_0_1_ignore_are_refused_when_checked(net, value):
    seg, edge, labels, target = batch(seed=2)
    target[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="edge_target holds values other than 0, 1 and ignore_index=255"):
        InverseFormLoss(net, tile_factor=1)(edge, target)
    with pytest.raises(ValueError, match="edge_target holds values other than 0, 1"):
        JointEdgeSegLoss(num_classes=5, inverseform=net)(seg, edge, labels, target)


def test_empty_batch_is_a_clear_error(net):
    seg, edge, labels, target = batch(n=0)
    with pytest.raises(ValueError, match=r"InverseFormLoss: the batch is empty \(N = 0\)"):
        InverseFormLoss(net, tile_factor=1, check_inputs=False)(edge, target)
    with pytest.raises(ValueError, match=r"JointEdgeSegLoss: the batch is empty"):
        JointEdgeSegLoss(num_classes=5, check_inputs=False)(seg, edge, labels, target)


def test_float_labels_are_refused_not_truncated():
    seg, edge, labels, target = batch(seed=3)
    with pytest.raises(ValueError, match=r"seg_target must hold integer class ids, got dtype torch.float32"):
        JointEdgeSegLoss(num_classes=5, check_inputs=False)(seg, edge, labels.float() + 0.7, target)
