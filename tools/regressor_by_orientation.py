"""How much of the InverseForm regressor's held-out error lies in the task: its report split by
how many boundary orientations a tile holds.

    python tools/regressor_by_orientation.py                       # the main job's regressor
    python tools/regressor_by_orientation.py --config my_regressor.yaml --regressor my.pth [--opt KEY=VALUE ...]

A tile whose boundaries all run one way (a horizon, a pole) shows no shift or scale along them,
so no regressor can read those components from it.  The held-out tiles of the regressor's report
(the same tiles and the same seeded warps) are ranked by the coherence of their structure tensor,
C = ((l1 - l2) / (l1 + l2))^2 of the summed outer products of the tile's gradients (1: every
boundary pixel runs the same way; near 0: all directions alike), and cut into equal bins; each bin
gets the report's Spearman(|theta|, distance) and mean distances.  The first line (all tiles)
equals the run's report.json.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def coherence(tiles: torch.Tensor) -> torch.Tensor:
    """N x 1 x T x T -> N: structure-tensor coherence over each tile (0 for a tile without gradient)."""
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None].to(tiles)
    # replicated borders: a tile is cut from a larger map, and its edge is not a boundary
    g = F.conv2d(F.pad(tiles.double(), (1, 1, 1, 1), mode="replicate"), kernels.double())
    gx, gy = g[:, 0], g[:, 1]
    jxx, jyy, jxy = (gx * gx).sum((1, 2)), (gy * gy).sum((1, 2)), (gx * gy).sum((1, 2))
    trace = jxx + jyy
    return torch.where(trace > 0, ((jxx - jyy) ** 2 + 4 * jxy ** 2) / trace.clamp_min(1e-30) ** 2,
                       torch.zeros_like(trace)).float()


def main(argv=None) -> None:
    from experiment.data import dataset_root
    from experiment.errors import UserError
    from experiment.methods.regressor import held_out_predictions, held_out_tiles, spearman
    from experiment.run_config import load_run_config
    from inverseform import InverseNet
    from utils.config import ConfigError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/synthetic_regressor.yaml", help="the regressor's config")
    parser.add_argument("--regressor", help="the regressor file (default: the config's output_path)")
    parser.add_argument("--bins", type=int, default=3, help="equal-count bins of coherence (default 3)")
    parser.add_argument("--opt", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, as the regressor was trained with them")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config([args.config], args.opt, cuda=False)
    except (ConfigError, UserError) as exc:
        sys.exit(f"error: {exc}")
    path = args.regressor or cfg.output_path
    if not os.path.isfile(path):
        sys.exit(f"error: --regressor {path} does not exist (train it with "
                 f"python -m experiment.train_inverseform --config {args.config})")
    if args.bins < 1:
        sys.exit(f"error: --bins must be >= 1, got {args.bins}")
    net = InverseNet.from_checkpoint(path)
    root, _ = dataset_root(cfg.data)
    tiles = held_out_tiles(cfg, root)
    pred_id, pred_tr, true_tr = held_out_predictions(net, tiles, cfg, net.normaliser, torch.device("cpu"), None)
    d_id, d_tr, magnitude = pred_id.norm(dim=1), pred_tr.norm(dim=1), true_tr.norm(dim=1)
    c = coherence(tiles)
    order = torch.argsort(c, stable=True)
    print(f"{path}: {len(tiles)} held-out tiles of {root} ({cfg.data.val_split})")
    print(f"{'tiles':<28} {'count':>5} {'coherence':>15} {'Spearman':>9} {'identity d':>11} {'warped d':>9}")

    def line(name, idx):
        cs = c[idx]
        print(f"{name:<28} {len(idx):>5} {float(cs.min()):>7.3f}-{float(cs.max()):.3f} "
              f"{spearman(magnitude[idx].numpy(), d_tr[idx].numpy()):>9.3f} "
              f"{float(d_id[idx].mean()):>11.4f} {float(d_tr[idx].mean()):>9.4f}")

    line("all", order)
    for k, idx in enumerate(np.array_split(order.numpy(), args.bins)):
        line(f"coherence bin {k + 1} of {args.bins}", torch.from_numpy(idx))


if __name__ == "__main__":
    main()
