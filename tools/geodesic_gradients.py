"""How large the InverseForm term's gradient gets, Euclidean against geodesic distance.

    python tools/geodesic_gradients.py            # the main job's regressor and synthetic val images

Cuts random 128 x 256 crops of the validation split's edge targets, makes a prediction for each
that a model in training might produce (the target blurred by a random sigma, a random gain and
bias, Gaussian noise on the logits), and prints, for each distance, the gradient norm of the
term with respect to the edge logits (median, 99th percentile, maximum) and, for the crops with
the largest geodesic gradients, the singular values and determinant of the regressed matrix of
each tile (docs/ablation.md#the-geodesic-terms-gradient).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets import Cityscapes, ValTransform  # noqa: E402
from inverseform import InverseFormLoss  # noqa: E402
from inverseform.distances import matrix_kind  # noqa: E402
from inverseform.tiling import image_to_tiles, resize_for_tiling  # noqa: E402
from inverseform.warps import params_to_matrix  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP = (128, 256)


def prediction(edge: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Edge logits of a model in training: the target blurred, scaled, shifted and noisy."""
    blurred = cv2.GaussianBlur(edge[0, 0].numpy(), (0, 0), rng.uniform(0.5, 8))
    noise = rng.standard_normal(edge.shape).astype(np.float32)
    return torch.from_numpy(blurred)[None, None] * rng.uniform(2, 30) + rng.uniform(-6, 0) + 0.5 * torch.from_numpy(noise)


def tile_matrices(loss: InverseFormLoss, logits: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    reg = loss.regressor
    with torch.no_grad():
        pred = image_to_tiles(resize_for_tiling(torch.sigmoid(logits), loss.resized_size), reg.tile_size)
        target = image_to_tiles(resize_for_tiling(edge, loss.resized_size), reg.tile_size)
        params = reg(pred, target).float() * reg.param_std + reg.param_mean
    return params_to_matrix(params.double(), matrix_kind(reg.parameterisation, params.shape[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regressor", default=os.path.join(ROOT, "checkpoints", "synthetic_regressor.pth"))
    parser.add_argument("--dataset_dir", default=os.path.join(ROOT, "data", "synthetic_cityscapes"))
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in (args.regressor, args.dataset_dir):
        if not os.path.exists(path):
            sys.exit(f"error: {path} does not exist (run the main job once: it makes both)")
    val = Cityscapes(args.dataset_dir, "val", transform=ValTransform(edge_radius=1), edge_radius=1)
    edges = (torch.stack([val[i]["edge"] for i in range(len(val))]) == 1).float()
    losses = {d: InverseFormLoss(args.regressor, tile_factor=1, distance=d, check_inputs=False)
              for d in ("euclidean", "geodesic")}
    rng = np.random.default_rng(args.seed)
    norms = {d: [] for d in losses}
    cases = []
    for _ in range(args.samples):
        i, y, x = rng.integers(len(val)), rng.integers(edges.shape[2] - CROP[0] + 1), rng.integers(edges.shape[3] - CROP[1] + 1)
        edge = edges[i:i + 1, :, y:y + CROP[0], x:x + CROP[1]]
        logits = prediction(edge, rng)
        for name, loss in losses.items():
            z = logits.clone().requires_grad_(True)
            loss(z, edge).backward()
            norms[name].append(float(z.grad.norm()))
        cases.append((logits, edge))
    for name, values in norms.items():
        v = np.array(values)
        print(f"{name:<10} gradient norm: median {np.median(v):.2e}, 99th percentile {np.percentile(v, 99):.2e}, "
              f"max {v.max():.2e} ({v.max() / np.median(v):.0f} x the median)")
    for k in np.argsort(norms["geodesic"])[::-1][:3]:
        m = tile_matrices(losses["geodesic"], *cases[k])
        tiles = "; ".join(f"singular values {np.round(torch.linalg.svdvals(t).numpy(), 3).tolist()}, "
                          f"det {float(torch.det(t)):+.3f}" for t in m)
        print(f"crop {k}: geodesic {norms['geodesic'][k]:.2e}, euclidean {norms['euclidean'][k]:.2e}; {tiles}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
