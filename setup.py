"""Build of the optional C++ extension ``srp4ctr._C`` (csrc/); everything else is in pyproject.toml.

The extension is optional: when it cannot be compiled (no C++17 compiler, an unsupported
platform), installation still succeeds and the engine falls back to its torch backend with one
warning. Set ``SRP4CTR_NO_EXT=1`` to skip it on purpose.
"""

import os
import sys

from setuptools import setup

ext_modules = []
if os.environ.get("SRP4CTR_NO_EXT", "0") in ("", "0"):
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    except ImportError:  # pybind11 is a build requirement; only a --no-build-isolation build lacks it
        print("srp4ctr: pybind11 not found, building without the C++ extension", file=sys.stderr)
    else:
        # the sources compile in parallel, one job per core ($SRP4CTR_BUILD_JOBS to choose)
        ParallelCompile("SRP4CTR_BUILD_JOBS", default=0).install()
        flags = ["-O3", "-fno-math-errno"] if sys.platform != "win32" else ["/O2"]
        link = []
        if os.environ.get("SRP4CTR_SANITIZE", "0") not in ("", "0"):
            # AddressSanitizer + UndefinedBehaviorSanitizer (csrc/tests/sanitize.sh): a build
            # for the tests only, run with the ASan runtime preloaded
            flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-math-errno",
                     "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
            link = ["-fsanitize=address,undefined"]
        ext = Pybind11Extension(
            "srp4ctr._C",
            sources=["csrc/module.cpp", "csrc/model.cpp", "csrc/cpu_features.cpp",
                     "csrc/threadpool.cpp", "csrc/tower_generic.cpp", "csrc/tower_avx2.cpp",
                     "csrc/tower_avx512.cpp", "csrc/tower_neon.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=flags,
            extra_link_args=link,
            depends=["csrc/tower.h", "csrc/tower_driver.inc"],
        )
        ext.optional = True  # a failed compile is a warning, not a failed install
        ext_modules.append(ext)

setup(ext_modules=ext_modules)
