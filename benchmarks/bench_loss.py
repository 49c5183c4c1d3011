"""Speed of JointEdgeSegLoss (forward + backward) against a straightforward implementation.

The straightforward version follows the reference's structure: a Python loop over images
for each cross-entropy (one log_softmax per image and per term, weights from torch.histc),
balanced-BCE weights computed in numpy (host round trips), the InverseForm tiles built by
concatenating 18 slices one at a time, and the regressor called on cat(x1, x2). Both use
the same randomly initialised released-layout regressor (224 x 224 tiles, 100M
parameters) and the sigmoid of the edge logits.

    python benchmarks/bench_loss.py [--repeats 7] [--batch 2] [--height 512] [--width 1024]

Prints the median time of each after warm-up, the speed-up and the largest difference
between the two losses' values and gradients. Timings are noisy when other jobs share
the CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from inverseform import InverseFormLoss, InverseNet, JointEdgeSegLoss  # noqa: E402


class StraightforwardJointLoss:
    """Per-image loops, concatenated tiles, numpy BCE weights: the reference's way."""

    def __init__(self, regressor: InverseNet, num_classes=19, ignore_index=255, tile_factor=3,
                 weights=(1.0, 0.3, 0.1, 0.3), threshold=0.8):
        self.net = regressor
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.tile_factor = tile_factor
        self.weights = weights
        self.threshold = threshold

    def image_ce(self, logits, target):
        loss = 0.0
        for i in range(logits.shape[0]):
            hist = torch.histc(target[i].float(), bins=self.num_classes, min=0, max=self.num_classes)
            norm = hist / hist.sum()
            weight = (hist != 0).float() * (1.0 - norm) + 1.0
            loss = loss + F.nll_loss(F.log_softmax(logits[i:i + 1], dim=1), target[i:i + 1],
                                     weight=weight, ignore_index=self.ignore_index)
        return loss

    def bce(self, logits, target):
        flat_logits = logits.reshape(1, -1)
        flat_target = target.reshape(1, -1).float()
        t = flat_target.detach().cpu().numpy()
        pos, neg = t == 1, t == 0
        weight = np.zeros(t.shape, dtype=np.float32)
        n_pos, n_neg = pos.sum(), neg.sum()
        weight[pos] = n_neg / (n_pos + n_neg)
        weight[neg] = n_pos / (n_pos + n_neg)
        weight = torch.from_numpy(weight).to(logits.device)
        return F.binary_cross_entropy_with_logits(flat_logits, flat_target, weight, reduction="mean")

    def inverseform(self, edge_logits, edge_target):
        t = self.net.tile_size
        size = (self.tile_factor * t, 2 * self.tile_factor * t)
        pred = F.interpolate(torch.sigmoid(edge_logits), size=size, mode="bilinear", align_corners=False)
        target = F.interpolate(edge_target.float(), size=size, mode="bilinear", align_corners=False)
        pred_tiles, target_tiles = pred[:, :, :t, :t], target[:, :, :t, :t]
        for i in range(self.tile_factor):
            for j in range(2 * self.tile_factor):
                if i + j:
                    pred_tiles = torch.cat((pred_tiles, pred[:, :, t * i:t * (i + 1), t * j:t * (j + 1)]), dim=0)
                    target_tiles = torch.cat((target_tiles, target[:, :, t * i:t * (i + 1), t * j:t * (j + 1)]), dim=0)
        x = torch.cat((pred_tiles.reshape(-1, t * t), target_tiles.reshape(-1, t * t)), dim=1)
        params = self.net.fc(x)
        return ((params * params).sum(dim=1) ** 0.5).mean()

    def __call__(self, seg_logits, edge_logits, seg_target, edge_target):
        w_seg, w_edge, w_att, w_inv = self.weights
        seg = self.image_ce(seg_logits, seg_target)
        edge_bce = self.bce(edge_logits, edge_target)
        masked = torch.where(edge_logits.max(1)[0] > self.threshold, seg_target,
                             torch.full_like(seg_target, self.ignore_index))
        att = self.image_ce(seg_logits, masked)
        inv = self.inverseform(edge_logits, edge_target)
        return w_seg * seg + w_edge * edge_bce + w_att * att + w_inv * inv


def make_inputs(batch, num_classes, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg_logits = torch.randn(batch, num_classes, height, width, generator=g)
    edge_logits = torch.randn(batch, 1, height, width, generator=g)
    # Piecewise-constant labels (8 x 8 px blocks) with some ignore, and their boundaries.
    blocks = torch.randint(0, num_classes, (batch, height // 8, width // 8), generator=g)
    seg_target = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    seg_target[torch.rand(seg_target.shape, generator=g) < 0.05] = 255
    edge = torch.zeros(batch, 1, height, width)
    edge[:, 0, 1:] += (seg_target[:, 1:] != seg_target[:, :-1]).float()
    edge[:, 0, :, 1:] += (seg_target[:, :, 1:] != seg_target[:, :, :-1]).float()
    return seg_logits, edge_logits, seg_target, (edge > 0).float()


def time_interleaved(fns, repeats, warmup=2):
    """Median time of each function; runs alternate so that background load hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    regressor = InverseNet(224, 4)  # released layout, random weights
    ours = JointEdgeSegLoss(num_classes=args.classes, inverseform=InverseFormLoss(regressor, check_inputs=False),
                            check_inputs=False)
    ours_checked = JointEdgeSegLoss(num_classes=args.classes, inverseform=InverseFormLoss(regressor))
    straightforward = StraightforwardJointLoss(regressor, num_classes=args.classes)
    seg_logits, edge_logits, seg_target, edge_target = make_inputs(
        args.batch, args.classes, args.height, args.width)

    s = seg_logits.requires_grad_(True)
    e = edge_logits.requires_grad_(True)

    def run(loss_fn, unpack):
        s.grad = e.grad = None
        out = loss_fn(s, e, seg_target, edge_target)
        total = out[0] if unpack else out
        total.backward()
        return total.detach(), s.grad, e.grad

    value_ours, gs_ours, ge_ours = run(ours, True)
    value_ref, gs_ref, ge_ref = run(straightforward, False)
    t_ours, t_checked, t_ref = time_interleaved(
        [lambda: run(ours, True), lambda: run(ours_checked, True), lambda: run(straightforward, False)],
        args.repeats)

    print(f"JointEdgeSegLoss forward+backward, batch {args.batch}, {args.classes} x {args.height} x "
          f"{args.width} logits, released-layout regressor (224 px tiles), {torch.get_num_threads()} threads")
    print(f"  straightforward (loops, cat tiles, numpy weights): {t_ref * 1000:8.1f} ms (median of {args.repeats})")
    print(f"  inverseform.JointEdgeSegLoss (check_inputs=False): {t_ours * 1000:8.1f} ms")
    print(f"  inverseform.JointEdgeSegLoss (check_inputs=True):  {t_checked * 1000:8.1f} ms")
    print(f"  speed-up: {t_ref / t_ours:.2f}x (with input checks {t_ref / t_checked:.2f}x)")
    print(f"  loss values: ours {value_ours.item():.6f}, straightforward {value_ref.item():.6f}, "
          f"|diff| {abs(value_ours - value_ref).item():.2e} "
          f"(relative {(abs(value_ours - value_ref) / abs(value_ref)).item():.2e})")
    print(f"  max |grad diff|: seg logits {(gs_ours - gs_ref).abs().max().item():.2e} "
          f"(max |grad| {gs_ref.abs().max().item():.2e}), edge logits {(ge_ours - ge_ref).abs().max().item():.2e} "
          f"(max |grad| {ge_ref.abs().max().item():.2e})")


if __name__ == "__main__":
    main()
