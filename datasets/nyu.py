"""NYU-Depth-v2 with the 40-class labels (NYUv2-40), as a configuration of the folder dataset.

The 1449 densely labelled frames of ``nyu_depth_v2_labeled.mat``, split as everyone splits them
(the official ``splits.mat``: 795 train, 654 test), with the 40 classes of Gupta, Arbelaez &
Malik (CVPR 2013); the class table is ``configs/classes/nyu40.yaml`` (stored 1..40 -> train ids
0..39, 0 = unlabeled -> 255).

Layout: the one of SA-Gate (charlesCXK/RGBD_Semantic_Segmentation_PyTorch, ``DATA/NYUDepthv2``),
which DFormer and CMX use too::

    <root>/RGB/<i>.jpg          colour frame i (1..1449)
    <root>/Label/<i>.png        its NYUv2-40 label map, uint8: 0 unlabeled, 1..40 the classes
    <root>/train.txt            795 lines  "RGB/<i>.jpg<TAB>Label/<i>.png"
    <root>/test.txt             654 lines, the same form
    (<root>/Depth/, <root>/HHA/ may be there too; they are not read)

Both splits have labels (the test split is the evaluation split).  Lists that name only the
image (DFormer's newer one-column ``RGB/<i>.jpg`` files) are refused; turn them into pairs with
``sed -E 's#^RGB/([^.]*)\\.jpg$#&\\tLabel/\\1.png#'``.
"""
import os

from utils.errors import InvalidInputError

from .class_table import ClassTable
from .folder import FolderSegmentation

__all__ = ["NYUDepthV2", "NYU_SPLITS", "NYU40_CLASS_TABLE", "nyu40_class_table"]

NYU_SPLITS = ("train", "test")
NYU40_CLASS_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "configs", "classes", "nyu40.yaml")


def nyu40_class_table():
    """The NYUv2-40 class table (``configs/classes/nyu40.yaml``)."""
    return ClassTable.from_yaml(NYU40_CLASS_TABLE)


class NYUDepthV2(FolderSegmentation):
    """NYUv2-40 in the SA-Gate layout (module docstring): a :class:`FolderSegmentation` over the
    list files ``train.txt`` / ``test.txt`` with the NYUv2-40 class table.  Arguments as
    :class:`~datasets.cityscapes.Cityscapes`; ``split`` is 'train' or 'test'."""

    kind = "NYUDepthV2"

    def __init__(self, root, split, transform=None, edge_radius=2, class_uniform_fraction=0.0,
                 class_uniform_tile=1024, seed=0, cache_dir=None, centroid_workers=None, progress=True):
        super().__init__(root, split, transform, edge_radius, class_uniform_fraction, class_uniform_tile, seed,
                         cache_dir, centroid_workers, progress, class_table=nyu40_class_table(), layout="list",
                         has_labels=True)

    def _check_split(self, split):
        if split not in NYU_SPLITS:
            raise InvalidInputError(f"NYUDepthV2: unknown split {split!r}; expected one of {NYU_SPLITS} "
                                    f"(the official 795 / 654 split)")
