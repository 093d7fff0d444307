"""Build and install megatron-grace.

The C++/CUDA extension ``megatron_grace._C`` (sources in ``csrc/``) is optional:
- the C++ CPU ops are built when torch is importable at build time and a C++ compiler exists;
- the CUDA ops are added when torch has CUDA and ``nvcc`` is found;
- otherwise (or if the build fails) the package installs without them and uses its
  pure-torch fallback. ``GRACE_BUILD_EXT=0`` skips the extension, ``=1`` makes a failed build an error.

Build without isolation so the installed torch (pinned, CPU or CUDA) is used and never replaced:
``pip install --no-build-isolation -e .`` (PEP 517/660 through pyproject.toml), or in place with
``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("GRACE_BUILD_EXT", "auto")


def _extensions() -> tuple[list, dict]:
    """The extension modules this machine can build, and the build_ext command to use."""
    if BUILD_EXT == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("megatron-grace: torch not importable at build time; skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        print("megatron-grace: no C++ compiler; skipping the extension (pure-torch fallback)", file=sys.stderr)
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    include = [os.path.join(ROOT, "csrc")]
    # no FMA (bit-exact vs pure torch). No -fopenmp: linking a second OpenMP runtime beside torch's own made every
    # torch op after a grace op up to 100x slower on 2 cores (spinning thread pools); the CPU kernels run serially.
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off"]
    with_cuda = bool(cu_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "megatron_grace._C", cpp_sources + cu_sources, include_dirs=include,
            define_macros=[("GRACE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--fmad=false"]},
        )
    else:
        ext = cpp_extension.CppExtension(
            "megatron_grace._C", cpp_sources, include_dirs=include,
            extra_compile_args={"cxx": cxx_flags},
        )
    print(f"megatron-grace: building extension with {'CUDA + C++' if with_cuda else 'C++ only'}", file=sys.stderr)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Build the extension, but fall back to pure torch if the build fails (unless forced)."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if BUILD_EXT == "1":
                    raise
                print(f"megatron-grace: extension build failed ({exc}); using the pure-torch fallback", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()

# Metadata, dependencies and entry points live in pyproject.toml; this file only adds the optional extension.
setup(ext_modules=ext_modules, cmdclass=cmdclass, zip_safe=False)
