"""InverseForm (CVPR 2021) as a standalone loss: copy this folder into any training loop.

It depends on PyTorch alone. Three lines add it to a loop whose network predicts an edge
map (one channel of logits) beside its segmentation::

    from inverseform import InverseFormLoss
    inverseform = InverseFormLoss("checkpoints/distance_measures_regressor.pth").to(device)
    loss = loss + 0.3 * inverseform(edge_logits, edge_target)   # N x 1 x H x W each, target in {0, 1}

or, for the reference's full objective (image-weighted CE + balanced BCE + edge attention +
InverseForm, each term also returned for logging)::

    from inverseform import JointEdgeSegLoss
    criterion = JointEdgeSegLoss(num_classes=19, inverseform="checkpoints/distance_measures_regressor.pth").to(device)
    loss, parts = criterion(seg_logits, edge_logits, seg_target, edge_target)

Why the sigmoid and not the reference's log_softmax. The regressor compares two boundary
maps, so the prediction it sees must be a boundary map: the per-pixel probability of an
edge, sigmoid(edge logits), in [0, 1] like the ground truth it was trained against. The
reference applies ``log_softmax`` over the single edge channel instead; a softmax over one
channel is identically 1, so its log is identically 0 - the regressor receives an all-zero
"prediction" whatever the network outputs, and the InverseForm term contributes a constant
with zero gradient. This package feeds the sigmoid probability, as the paper describes.

The regressor is frozen (eval mode, no parameter gradients) while gradients reach the edge
logits; all tiles of a batch go through it in one call; the losses run on the input's
device, in float32 under autocast, without host synchronisation (except the optional input
check, ``check_inputs=True``, one sync per call). Train your own regressor for another
dataset with :mod:`inverseform.warps` (transforms, sampling, normalisation) and save it with
:func:`save_regressor` (released weight format plus a metadata JSON).
"""
from .distances import (
    euclidean_distance,
    frobenius_distance,
    geodesic_distance,
    matrix_kind,
    regressor_distance,
    safe_arccos,
    so3_projection,
)
from .loss import (
    ImageWeightedCrossEntropy,
    InverseFormLoss,
    JointEdgeSegLoss,
    balanced_bce_with_logits,
    edge_attention_cross_entropy,
    image_weighted_cross_entropy,
    pixel_nll,
)
from .regressor import VARIANTS, InverseNet, create_inverse_net, save_regressor
from .tiling import image_to_tiles, resize_for_tiling, tiles_to_image
from .warps import (
    DEFAULT_RANGES,
    KIND_NUM_PARAMS,
    ParamNormaliser,
    matrix_components,
    matrix_to_params,
    params_to_matrix,
    sample_deviations,
    warp,
    warp_pairs,
)

__all__ = [
    "InverseNet",
    "VARIANTS",
    "create_inverse_net",
    "save_regressor",
    "InverseFormLoss",
    "JointEdgeSegLoss",
    "ImageWeightedCrossEntropy",
    "image_weighted_cross_entropy",
    "balanced_bce_with_logits",
    "edge_attention_cross_entropy",
    "pixel_nll",
    "euclidean_distance",
    "frobenius_distance",
    "geodesic_distance",
    "so3_projection",
    "safe_arccos",
    "regressor_distance",
    "matrix_kind",
    "image_to_tiles",
    "tiles_to_image",
    "resize_for_tiling",
    "KIND_NUM_PARAMS",
    "DEFAULT_RANGES",
    "params_to_matrix",
    "matrix_to_params",
    "warp",
    "warp_pairs",
    "sample_deviations",
    "matrix_components",
    "ParamNormaliser",
]
