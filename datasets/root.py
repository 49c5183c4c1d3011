"""Where the data lives: an explicit directory, $CITYSCAPES_DATASET, or the synthetic default."""
import logging
import os

from utils.errors import MissingInputError

__all__ = ["resolve_root", "DEFAULT_SYNTHETIC_ROOT"]

log = logging.getLogger(__name__)

DEFAULT_SYNTHETIC_ROOT = os.path.join("data", "synthetic_cityscapes")


def resolve_root(dataset_dir=None, synthetic_root=None):
    """Return ``(root, is_synthetic)``.

    Precedence: ``dataset_dir`` (config / ``--dataset_dir``), then the
    ``CITYSCAPES_DATASET`` environment variable, else the embedded default - the
    synthetic dataset at ``synthetic_root`` (default ``$INVERSEFORM_SYNTHETIC_DIR`` or
    ``data/synthetic_cityscapes`` relative to the current directory), generated with the
    default parameters if it is absent.  A given directory that does not exist is an
    error naming where it came from.
    """
    for source, value in (("dataset_dir", dataset_dir),
                          ("the CITYSCAPES_DATASET environment variable",
                           os.environ.get("CITYSCAPES_DATASET") or None)):
        if value:
            root = os.path.abspath(os.path.expanduser(os.fspath(value)))
            if not os.path.isdir(root):
                raise MissingInputError(f"Cityscapes root {root!r} (from {source}) does not exist")
            return root, False
    root = os.path.abspath(os.path.expanduser(os.fspath(
        synthetic_root or os.environ.get("INVERSEFORM_SYNTHETIC_DIR") or DEFAULT_SYNTHETIC_ROOT)))
    if not os.path.exists(root):
        log.warning("no Cityscapes root given (dataset_dir / CITYSCAPES_DATASET): generating the "
                    "synthetic default dataset at %s", root)
    from .synthetic import ensure_synthetic  # deferred: keeps `python -m datasets.synthetic` clean

    return ensure_synthetic(root), True
