"""Build the Cython fast path.  Everything else lives in pyproject.toml.

``PIMCORE_NO_EXT=1`` skips the extension (the pure-Python twin then serves).
"""

import os

from setuptools import setup

ext_modules = []
if os.environ.get("PIMCORE_NO_EXT") != "1":
    from Cython.Build import cythonize

    ext_modules = cythonize(
        ["pimcore/_fastpath.pyx"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
        quiet=True,
    )

setup(ext_modules=ext_modules)
