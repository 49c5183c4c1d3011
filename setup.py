"""Packaging for the InverseForm boundary-aware segmentation codebase.

Only the standalone plug-ins (``inverseform``, ``rloss``: they import nothing else of this
repository) are installed as top-level packages.  The rest keeps the repository's layout
(``models/``, ``datasets/``, ``utils/``, ``experiment/`` at the root, run from there as
``python -m experiment.train``), but those generic names would shadow or overwrite other
distributions (Hugging Face ``datasets``), so ``pip install .`` puts them, with ``configs/``,
in the private folder ``inverseform_seg/_root/``, which the console scripts
(``inverseform_seg.cli``) put first on their own ``sys.path``.  ``pip install -e .`` maps only
``inverseform``, ``rloss`` and ``inverseform_seg`` (pyproject.toml asks for a setuptools whose
editable installs map packages instead of adding the repository to ``sys.path``); the console
scripts then use the checkout itself.

PyTorch is deliberately left to the user's choice of build: on a CPU-only
machine ``pip install torch==2.13.0 -e .`` takes the CPU wheel; on a GPU
machine install a CUDA build first (see README, "GPU set-up"), and the range below
accepts it without pulling another copy.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Standalone plug-ins: importable from anywhere under their own names (add new ones here).
PLUGINS = [name for name in ("inverseform", "rloss") if os.path.isfile(os.path.join(HERE, name, "__init__.py"))]
# The application's packages and data: private, under inverseform_seg/_root/ (see the docstring).
PRIVATE_ROOT = "inverseform_seg._root"
PRIVATE_PACKAGES = ["experiment", "models", "datasets", "utils"]
PRIVATE_DATA = {"configs": ["*.yaml", "classes/*.yaml"]}


def with_subpackages(names):
    return [p for name in names for p in find_packages(HERE, include=[name, name + ".*"])]


PACKAGES = with_subpackages(PLUGINS) + ["inverseform_seg"] + [
    f"{PRIVATE_ROOT}.{p}" for p in with_subpackages(PRIVATE_PACKAGES) + list(PRIVATE_DATA)]
PACKAGE_DIR = {f"{PRIVATE_ROOT}.{name}": name for name in PRIVATE_PACKAGES + list(PRIVATE_DATA)}
PACKAGE_DATA = {f"{PRIVATE_ROOT}.{name}": patterns for name, patterns in PRIVATE_DATA.items()}

CONSOLE_SCRIPTS = [
    "inverseform-synthetic = inverseform_seg.cli:synthetic",
    "inverseform-validate = inverseform_seg.cli:validate",
    "inverseform-train = inverseform_seg.cli:train",
    "inverseform-train-regressor = inverseform_seg.cli:train_regressor",
    "inverseform-infer = inverseform_seg.cli:infer",
    "inverseform-ablation = inverseform_seg.cli:ablation",
]

setup(
    name="inverseform-seg",
    version="0.1.0",
    description=(
        "Boundary-aware semantic segmentation with the InverseForm loss (CVPR 2021): "
        "HRNet/OCRNet/HMS models, the loss as a plug-in, training and validation."
    ),
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "numpy",
        "opencv-python-headless",
        "scipy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        # model folders (models.save_pretrained / from_pretrained, tools/export.py --format safetensors):
        # weights that load without unpickling anything.
        "safetensors",
    ],
    extras_require={
        # cityscapesscripts is the official Cityscapes tooling; the tests use its
        # label table and evaluator as an independent oracle.  onnx + onnxruntime: the default-run
        # ONNX export test (legacy exporter; about 1 min to download and install in a fresh venv).
        "test": ["pytest", "cityscapesscripts", "onnx", "onnxruntime"],
        # tools/export.py: onnxscript for PyTorch's (default) ONNX exporter, onnxruntime to check the file.
        "export": ["onnx", "onnxscript", "onnxruntime"],
        # tools/export.py --push_to_hub: upload a model folder to the Hugging Face Hub.
        "hub": ["huggingface_hub"],
    },
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
