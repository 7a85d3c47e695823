"""Installation of autoseg. Install torch first (``pip install torch==2.13.0`` takes the local CPU
wheel), so that pip never resolves a CUDA build for the ``torch`` requirement below."""

import re
from pathlib import Path

from setuptools import find_packages, setup

# One source for the version: autoseg/__init__.py (read as text: importing autoseg would need torch).
VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    Path(__file__).with_name("autoseg").joinpath("__init__.py").read_text(encoding="utf-8"),
    re.MULTILINE,
).group(1)

setup(
    name="autoseg",
    version=VERSION,
    description="Self-configuring stroke lesion segmentation (plan, preprocess, train, predict, evaluate)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["autoseg", "autoseg.*", "planners", "planners.*", "trainers", "trainers.*"]),
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "SimpleITK>=2.2",
        "batchgenerators>=0.25",
        "scikit-image>=0.21",
        "pandas>=2.0",
        "acvl-utils>=0.2",
        "connected-components-3d>=3",  # 26-connected lesion counting (also required by acvl-utils)
        "nilearn>=0.10",  # ships the MNI152 2009 template the demo data is built on
        "nibabel>=5",  # NaN/Inf check of NIfTI files (ITK's reader turns them into 0); comes with nilearn
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pillow>=9",  # palette PNGs of the results page; comes with matplotlib
        "pybids>=0.16",  # autoseg_predict --bids: BIDS datasets in, BIDS derivatives out
    ],
    extras_require={"test": ["pytest>=7", "ruff==0.17.6", "selenium>=4.11"]},  # selenium: the results page in Chromium
    entry_points={
        "console_scripts": [
            "autoseg_demo=autoseg.commands.demo:main",
            "autoseg_convert=autoseg.commands.convert:main",
            "autoseg_plan=autoseg.commands.plan:main",
            "autoseg_evaluate=autoseg.commands.evaluate:main",
            "autoseg_train=autoseg.commands.train:main",
            "autoseg_predict=autoseg.commands.predict:main",
            "autoseg_find_best=autoseg.commands.find_best:main",
            "autoseg_pretrain=autoseg.commands.pretrain:main",
            "autoseg_export=autoseg.commands.export:main",
            "autoseg_import=autoseg.commands.import_model:main",
        ]
    },
)
