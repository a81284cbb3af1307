"""Build script: the pure-Python package, with the Triton kernels of ``kernels/`` installed as
``loraprune.kernels``. The CUDA extension ``loraprune._C`` is added by the CUDA build below."""

from setuptools import find_packages, setup

packages = [*find_packages(include=["loraprune", "loraprune.*"]), "loraprune.kernels"]

setup(
    packages=packages,
    package_dir={"loraprune.kernels": "kernels"},
)
