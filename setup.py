"""Installable package `loft_kernels`.

The C++ (OpenMP) and CUDA kernels in csrc/ are compiled with ninja through
torch.utils.cpp_extension on first use and cached (see loft_kernels/_ext.py),
so installing needs no compiler run and no torch at build time.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

here = Path(__file__).parent


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package (loft_kernels/csrc), where loft_kernels._ext finds it
    after a non-editable install; an editable install builds from <repo>/csrc directly."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not (here / "csrc").is_dir():
            return
        target = Path(self.build_lib) / "loft_kernels" / "csrc"
        shutil.copytree(here / "csrc", target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))

setup(
    name="loft_kernels",
    version="0.1.0",
    description="LoFT (filter-wise training for lottery tickets) for PyTorch, with fused kernels",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["loft_kernels", "loft_kernels.*"]),
    # The C++/CUDA sources travel inside the package so the JIT build finds them.
    cmdclass={"build_py": BuildPyWithSources},
    include_package_data=True,
    # A range, not a pin: a user's existing (CUDA) torch is kept. The README's
    # commands pin torch==2.13.0 so a fresh CPU machine gets the CPU wheel.
    # ninja builds the C++/CUDA extension on first use (torch ships the pybind11 headers).
    install_requires=["torch>=2.4", "numpy", "ninja", "tqdm"],
    # Optional features (loft_kernels/_optional.py says which extra a missing module needs).
    extras_require={
        "plots": ["matplotlib"],
        "digits": ["scikit-learn"],
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "matplotlib", "scikit-learn"],
        "all": ["matplotlib", "scikit-learn", "triton"],
    },
    entry_points={"console_scripts": ["loft = loft_kernels.cli:main"]},
)
