"""HRNetV2 trunks: W16-slim, W18 and W48.

An HRNetV2 trunk keeps a stride-4 branch alive through the whole network and adds
lower-resolution branches stage by stage (stride 8, 16, 32), exchanging
information between all branches after every module ("fuse").  Its output is the
four branches upsampled to stride 4 and concatenated.

The variants differ only in a handful of numbers, kept in :data:`TRUNK_CONFIGS`.
Attribute names follow the released checkpoints (``conv1``, ``layer1``,
``transition1``, ``stage2.0.fuse_layers.1.0.0.0`` ...), so those files load
unchanged.  A transition or fuse slot that needs no layer holds ``None``; the
slot keeps the index positions that the checkpoint names rely on.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .layers import batch_norm, resize_to


@dataclass(frozen=True)
class TrunkConfig:
    """Shape of one HRNetV2 variant.

    channels: width of the four branches (stride 4, 8, 16, 32).
    stage1_blocks: bottleneck blocks of stage 1 (64 planes, 256 out).
    stage_modules: number of multi-branch modules in stages 2, 3, 4.
    blocks_per_branch: basic blocks per branch in each module of stages 2-4.
    stem_downsample: the "slim" trick: an extra 2x2 stride-2 conv (3->3 channels,
        no norm) before the stem, so the whole trunk runs at half resolution.
    """

    name: str
    channels: Tuple[int, int, int, int]
    stage1_blocks: int
    stage_modules: Tuple[int, int, int]
    blocks_per_branch: int
    stem_downsample: bool = False

    @property
    def out_channels(self) -> int:
        return sum(self.channels)


TRUNK_CONFIGS = {
    "w16_slim": TrunkConfig("w16_slim", (16, 32, 64, 128), 2, (1, 3, 2), 2, stem_downsample=True),
    "w18": TrunkConfig("w18", (18, 36, 72, 144), 2, (1, 3, 2), 2),
    "w48": TrunkConfig("w48", (48, 96, 192, 384), 4, (1, 4, 3), 4),
}

# The reference selects the trunk with ``--hrnet_base``.
TRUNK_FOR_BASE = {16: "w16_slim", 18: "w18", 48: "w48"}


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = batch_norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1, bias=False)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = batch_norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = batch_norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def make_blocks(block, in_ch: int, planes: int, num_blocks: int) -> nn.Sequential:
    """A chain of residual blocks; the first one projects the shortcut if widths differ."""
    out_ch = planes * block.expansion
    downsample = None
    if in_ch != out_ch:
        downsample = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1, bias=False),
            batch_norm(out_ch),
        )
    layers = [block(in_ch, planes, 1, downsample)]
    layers += [block(out_ch, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*layers)


def _strided_convs(in_ch: int, out_ch: int, steps: int, last_relu: bool) -> nn.Sequential:
    """``steps`` 3x3 stride-2 convs; only the last one changes the width.

    Each step is its own Sequential(conv, bn[, relu]) so parameter names read
    ``<k>.0.weight`` / ``<k>.1.weight`` like the checkpoints.
    """
    convs = []
    for k in range(steps):
        last = k == steps - 1
        target = out_ch if last else in_ch
        layers = [nn.Conv2d(in_ch, target, 3, 2, 1, bias=False), batch_norm(target)]
        if not last or last_relu:
            layers.append(nn.ReLU(inplace=True))
        convs.append(nn.Sequential(*layers))
    return nn.Sequential(*convs)


class HighResolutionModule(nn.Module):
    """Parallel branches of basic blocks followed by an all-to-all fuse.

    Fuse into branch i: a higher-resolution branch j < i is brought down by i-j
    stride-2 3x3 convs; a lower-resolution branch j > i by a 1x1 conv + BN and a
    bilinear upsample to branch i's size.  Contributions are summed in branch
    order, then ReLU.
    """

    def __init__(self, channels: Sequence[int], num_blocks: int):
        super().__init__()
        self.num_branches = len(channels)
        self.branches = nn.ModuleList(
            [make_blocks(BasicBlock, ch, ch, num_blocks) for ch in channels]
        )
        fuse_layers = []
        for i, ch_i in enumerate(channels):
            row: List[Optional[nn.Module]] = []
            for j, ch_j in enumerate(channels):
                if j > i:
                    row.append(nn.Sequential(
                        nn.Conv2d(ch_j, ch_i, 1, 1, 0, bias=False), batch_norm(ch_i)))
                elif j == i:
                    row.append(None)
                else:
                    row.append(_strided_convs(ch_j, ch_i, i - j, last_relu=False))
            fuse_layers.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse_layers)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        fused = []
        for i in range(self.num_branches):
            target_size = xs[i].shape[-2:]
            y = xs[0] if i == 0 else self.fuse_layers[i][0](xs[0])
            for j in range(1, self.num_branches):
                if j == i:
                    y = y + xs[j]
                elif j > i:
                    y = y + resize_to(self.fuse_layers[i][j](xs[j]), target_size)
                else:
                    y = y + self.fuse_layers[i][j](xs[j])
            fused.append(self.relu(y))
        return fused


class HRNetV2(nn.Module):
    """HRNetV2 trunk; ``forward`` returns the stride-4 concatenation of all branches.

    ``out_channels`` is the width of that output (240 / 270 / 720).
    """

    def __init__(self, config: TrunkConfig):
        super().__init__()
        self.config = config
        if config.stem_downsample:
            self.conv0 = nn.Conv2d(3, 3, kernel_size=2, stride=2, padding=0, bias=False)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = batch_norm(64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = batch_norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_blocks(Bottleneck, 64, 64, config.stage1_blocks)

        prev = [64 * Bottleneck.expansion]
        for stage, num_modules in zip((2, 3, 4), config.stage_modules):
            cur = list(config.channels[:stage])
            setattr(self, f"transition{stage - 1}", self._transition(prev, cur))
            setattr(self, f"stage{stage}", nn.Sequential(
                *[HighResolutionModule(cur, config.blocks_per_branch) for _ in range(num_modules)]
            ))
            prev = cur
        self.out_channels = config.out_channels

    @staticmethod
    def _transition(prev: Sequence[int], cur: Sequence[int]) -> nn.ModuleList:
        """Adapt the previous stage's branches and spawn the new lowest-resolution one."""
        layers: List[Optional[nn.Module]] = []
        for i, ch in enumerate(cur):
            if i < len(prev):
                if prev[i] == ch:
                    layers.append(None)
                else:
                    layers.append(nn.Sequential(
                        nn.Conv2d(prev[i], ch, 3, 1, 1, bias=False), batch_norm(ch),
                        nn.ReLU(inplace=True)))
            else:
                # The new branch grows from the previous lowest-resolution one.
                layers.append(_strided_convs(prev[-1], ch, i + 1 - len(prev), last_relu=True))
        return nn.ModuleList(layers)

    @staticmethod
    def _apply_transition(transition: nn.ModuleList, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for i, layer in enumerate(transition):
            source = xs[i] if i < len(xs) else xs[-1]
            out.append(source if layer is None else layer(source))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.stem_downsample:
            x = self.conv0(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for stage in (2, 3, 4):
            xs = self._apply_transition(getattr(self, f"transition{stage - 1}"), xs)
            xs = getattr(self, f"stage{stage}")(xs)
        size = xs[0].shape[-2:]
        return torch.cat([xs[0]] + [resize_to(t, size) for t in xs[1:]], dim=1)

    def reset_parameters(self) -> None:
        """The reference trunk's initialisation: conv weights N(0, 0.001), BN 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def hrnetv2(name: str) -> HRNetV2:
    """Build a trunk by variant name (a key of :data:`TRUNK_CONFIGS`), initialised."""
    try:
        config = TRUNK_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown HRNetV2 variant {name!r}; valid: {sorted(TRUNK_CONFIGS)}") from None
    trunk = HRNetV2(config)
    trunk.reset_parameters()
    return trunk
