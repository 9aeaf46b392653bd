"""Build script for fastdet's one native extension, ``fastdet._C``.

CPU kernels are always built. CUDA kernels are built when the installed torch has CUDA and nvcc is found;
``FASTDET_CUDA=1`` forces them on (the build fails loudly if it cannot), ``FASTDET_CUDA=0`` forces them off.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _find_cuda_home():
    """Locate a CUDA toolkit, preferring a real toolkit folder over a wrapper script's parent.

    On some machines ``/usr/local/bin/nvcc`` is a wrapper script, which makes torch guess ``CUDA_HOME=/usr/local``;
    that folder has no ``include/cuda_runtime.h``. We look for the folder whose ``include`` really has it.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists() and (
            Path(candidate) / "bin" / "nvcc"
        ).exists():
            return str(Path(candidate))
    return None


def _cuda_wheel_include_dirs():
    """Header folders shipped by the nvidia-* wheels that the CUDA build of torch depends on.

    torch's headers include e.g. ``cusparse.h`` and ``cublas_v2.h``; a minimal toolkit may lack them, while the
    wheels put them under ``site-packages/nvidia/<pkg>/include`` (CUDA 12) or ``site-packages/nvidia/cu13/include``.
    """
    dirs = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            dirs += sorted(str(p) for p in nvidia.glob("*/include") if p.is_dir())
    seen = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]


def _want_cuda(torch):
    flag = os.environ.get("FASTDET_CUDA", "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False, None
    cuda_home = _find_cuda_home()
    available = torch.version.cuda is not None and cuda_home is not None
    if flag in ("1", "true", "on", "yes"):
        if torch.version.cuda is None:
            raise RuntimeError("FASTDET_CUDA=1 but the installed torch is a CPU-only build (torch.version.cuda is None)")
        if cuda_home is None:
            raise RuntimeError("FASTDET_CUDA=1 but no CUDA toolkit with nvcc was found; set CUDA_HOME")
        return True, cuda_home
    return available, cuda_home


# The oldest torch this build runs on. The native code uses only the LibTorch stable ABI up to this version
# (TORCH_TARGET_VERSION hides everything newer at compile time), so one build serves every torch from here on.
# 2.11 is the torch of the lent GPU machines; fastdet/_extension.py refuses anything older with a clear message.
MIN_TORCH = (2, 11)


def _target_version_macro():
    major, minor = MIN_TORCH
    return f"0x{major:02X}{minor:02X}000000000000"


def _extensions():
    import torch
    from torch.utils import cpp_extension

    with_cuda, cuda_home = _want_cuda(torch)
    cpu_sources = [str(CSRC / "extension.cpp")] + sorted(glob.glob(str(CSRC / "ops" / "*.cpp")))
    cpu_sources += sorted(glob.glob(str(CSRC / "ops" / "cpu" / "*.cpp")))
    define_macros = [
        ("TORCH_TARGET_VERSION", _target_version_macro()),
        ("FASTDET_MIN_TORCH", '"%d.%d"' % MIN_TORCH),
    ]
    cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden"]
    if sys.platform != "win32":
        # Compile the OpenMP pragmas of vectorised loops, but link no libgomp of our own: threads come from torch's
        # pool through the stable parallel_for.
        cxx_flags.append("-fopenmp")
    include_dirs = [str(CSRC)]
    print(f"fastdet: building {'CPU + CUDA' if with_cuda else 'CPU-only'} extension "
          f"(torch {torch.__version__}, CUDA {torch.version.cuda}, CUDA_HOME {cuda_home}, "
          f"stable ABI target torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]})", flush=True)
    extensions = [
        cpp_extension.CppExtension(
            name="fastdet._C",
            sources=[os.path.relpath(s, ROOT) for s in cpu_sources],
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            py_limited_api=True,
        )
    ]
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME at import time; point it at the real toolkit.
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            try:
                visible = torch.cuda.is_available()
            except Exception:
                visible = False
            if not visible:
                # No GPU to query: cover Ampere (A100) and Hopper (H100/H200) with SASS, plus PTX for newer GPUs.
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        cuda_sources = [str(CSRC / "cuda_extension.cpp")] + sorted(glob.glob(str(CSRC / "ops" / "cuda" / "*.cu")))
        # The CUDA kernels live in a library of their own, fastdet._C_cuda, which links torch's CUDA libraries and is
        # loaded only where torch has CUDA: the CPU ops of the same build keep working under a CPU-only torch.
        extensions.append(
            cpp_extension.CUDAExtension(
                name="fastdet._C_cuda",
                sources=[os.path.relpath(s, ROOT) for s in cuda_sources],
                include_dirs=include_dirs + _cuda_wheel_include_dirs(),
                define_macros=define_macros + [("USE_CUDA", None)],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
                },
                py_limited_api=True,
            )
        )
    return extensions


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class PersistentBuildExtension(BuildExtension):
        """Compiles into <repo>/build/temp-fastdet, kept between builds, so ninja recompiles only changed files.

        pip's isolated builds, `pip install -e .` and `setup.py build_ext --inplace` all share the folder; a changed
        compiler command (another torch, another FASTDET_CUDA) makes ninja rebuild what it affects.
        """

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(ROOT / "build" / "temp-fastdet")

    return PersistentBuildExtension.with_options(use_ninja=True)


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    # The extension uses only CPython's limited API (3.10) and torch's stable ABI: one wheel for CPython >= 3.10.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
