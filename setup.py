"""Package list for setuptools; everything else is declared in pyproject.toml.

The package list is computed here, not listed in pyproject.toml, so that every subpackage of
``redlockdlm/`` (any folder with an ``__init__.py``) lands in the wheel without editing the
list by hand. ``cli/`` and ``lua/`` are mapped to ``redlockdlm_cli`` and ``redlockdlm._lua``
by ``[tool.setuptools.package-dir]`` in pyproject.toml.
"""

from setuptools import find_packages, setup

PACKAGES = ["redlockdlm", "redlockdlm_cli", "redlockdlm._lua"]
PACKAGES += [f"redlockdlm.{p}" for p in find_packages(where="redlockdlm")]

setup(packages=PACKAGES)
