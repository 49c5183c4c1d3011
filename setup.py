"""Packaging for the InverseForm boundary-aware segmentation codebase.

The top-level packages are installed side by side (``inverseform``, ``models``,
``datasets``, ``experiment``, ``utils``), matching the reference's layout that
users already know.  ``pip install -e .`` is the recommended install.

PyTorch is deliberately left to the user's choice of build: on a CPU-only
machine ``pip install torch==2.13.0 -e .`` takes the CPU wheel; on a GPU
machine install a CUDA build first (see README, "Set-up"), and the range below
accepts it without pulling another copy.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

CONSOLE_SCRIPTS = [
    "inverseform-synthetic = datasets.synthetic:main",
    "inverseform-validate = experiment.validation:main",
    "inverseform-train = experiment.train:main",
    "inverseform-train-regressor = experiment.train_inverseform:main",
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
    packages=[
        "inverseform",
        "models",
        "datasets",
        "experiment",
        "utils",
    ],
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "numpy",
        "opencv-python-headless",
        "scipy",
        "pyyaml",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        # cityscapesscripts is the official Cityscapes tooling; the tests use its
        # label table and evaluator as an independent oracle.
        "test": ["pytest", "cityscapesscripts"],
    },
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
