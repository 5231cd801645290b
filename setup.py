"""Metadata lives in pyproject.toml; this file exists for `pip install .` on old pips and
for the optional CUDA extension in csrc/ (none has earned its place yet, see csrc/README.md)."""
from setuptools import setup

setup()
