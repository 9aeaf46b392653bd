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


def _extensions():
    import torch
    from torch.utils import cpp_extension

    with_cuda, cuda_home = _want_cuda(torch)
    sources = sorted(glob.glob(str(CSRC / "*.cpp"))) + sorted(glob.glob(str(CSRC / "ops" / "*.cpp")))
    sources += sorted(glob.glob(str(CSRC / "ops" / "cpu" / "*.cpp")))
    define_macros = []
    extra_compile_args = {"cxx": ["-O3"]}
    include_dirs = [str(CSRC)]
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
        sources += sorted(glob.glob(str(CSRC / "ops" / "cuda" / "*.cu")))
        include_dirs += _cuda_wheel_include_dirs()
        define_macros.append(("FASTDET_WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        extension_cls = cpp_extension.CUDAExtension
    else:
        extension_cls = cpp_extension.CppExtension
    if sys.platform != "win32":
        # Compile the OpenMP pragmas inside at::parallel_for, but do not link a libgomp of our own: the GOMP symbols
        # then resolve through libtorch_cpu to the OpenMP runtime torch already loaded (one thread pool, not two).
        extra_compile_args["cxx"].append("-fopenmp")
    print(f"fastdet: building {'CPU + CUDA' if with_cuda else 'CPU-only'} extension "
          f"(torch {torch.__version__}, CUDA {torch.version.cuda}, CUDA_HOME {cuda_home})", flush=True)
    return [
        extension_cls(
            name="fastdet._C",
            sources=[os.path.relpath(s, ROOT) for s in sources],
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True, no_python_abi_suffix=False)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
