"""The DenseCRF regularized loss (Tang et al., ECCV 2018) as a standalone package.

It depends on PyTorch alone: copy this folder into any training loop. Three lines add the
term to a loop that trains from partial labels (scribbles)::

    from rloss import DenseCRFLoss
    densecrf = DenseCRFLoss(weight=2e-9, sigma_rgb=15, sigma_xy=100, scale_factor=0.5)
    loss = partial_ce + densecrf(image_0_255, torch.softmax(logits, 1), roi)   # roi: 0 on padding

The filter is the reference's permutohedral lattice (meng-tang/rloss, a C++ library on the
CPU) rebuilt from tensor operations: all classes in one pass, the whole batch at once on a GPU
(a few images per thread on a CPU, where that stays in cache), on the input's device, with the
same loss and gradient (to float rounding).  ``bilateral_filter`` exposes
the filter alone (``A @ values`` for a batch); ``kernel="exact"`` is the dense Gaussian.
"""
from .filter import KERNELS, bilateral_filter, exact_filter
from .lattice import PermutohedralLattice, lattice_features
from .loss import DenseCRFLoss, densecrf_loss

__all__ = ["DenseCRFLoss", "densecrf_loss", "bilateral_filter", "exact_filter", "PermutohedralLattice",
           "lattice_features", "KERNELS"]
