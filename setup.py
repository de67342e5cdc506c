"""Build the Cython engine (engine/*.pyx) into extension modules under pykv._engine.

Knobs (environment variables):
  PYKV_DEBUG=1     compile with -O0 -g and Cython line tracing (for profilers/gdb)
  PYKV_ANNOTATE=1  write cython -a HTML next to each .pyx (inspect the hot paths)
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.sdist import sdist

HERE = Path(__file__).parent
DEBUG = os.environ.get("PYKV_DEBUG") == "1"
ANNOTATE = os.environ.get("PYKV_ANNOTATE") == "1"


def engine_extensions() -> list[Extension]:
    sources = sorted((HERE / "engine").glob("*.pyx"))
    if not sources:
        raise SystemExit("engine/*.pyx not found: pykv cannot be built without its engine")
    compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
    macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
    return [
        Extension(
            f"pykv._engine.{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            include_dirs=[str(HERE / "engine")],  # C headers such as crc32c.h
            depends=[  # C headers and Cython includes: a change to one rebuilds every module
                str(p.relative_to(HERE))
                for pattern in ("*.h", "*.pxi")
                for p in sorted((HERE / "engine").glob(pattern))
            ],
            extra_compile_args=compile_args,
            define_macros=macros,
        )
        for pyx in sources
    ]


class SdistWithEngineSources(sdist):
    """Put engine/*.pyx and *.h in the sdist (setuptools would ship only the generated .c)."""

    def make_release_tree(self, base_dir, files) -> None:
        engine = [str(p.relative_to(HERE)) for p in sorted((HERE / "engine").glob("*.[ph]*"))]
        super().make_release_tree(base_dir, sorted(set(files) | set(engine)))


setup(
    cmdclass={"sdist": SdistWithEngineSources},
    # Ship the .pxd contracts and .pyi stubs so that other Cython code and type checkers see them.
    package_data={"pykv._engine": ["*.pxd", "*.pyi", "py.typed"]},
    ext_modules=cythonize(
        engine_extensions(),
        language_level="3",
        # The modules' contracts, pykv/_engine/*.pxd, are found as pykv._engine.<name>.pxd.
        include_path=[str(HERE)],
        annotate=ANNOTATE,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "linetrace": DEBUG,
        },
    ),
)
