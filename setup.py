"""Build aigc_rt and its native extensions.

aigc_rt._C             C++ CPU kernels (csrc/cpu/*.cpp + csrc/bindings.cpp), always built.
aigc_rt._cuda_kernels  CUDA kernels (csrc/cuda/*.cu): a plain shared library (no torch headers; the CUDA runtime
                       linked statically, so it needs only the driver where it runs) that aigc_rt/cuda_kernels.py
                       calls through ctypes. Built by nvcc wherever nvcc is found (CUDA_HOME or PATH), GPU or not,
                       for sm_80 and sm_90 (+ PTX for later GPUs). AIGC_RT_NO_CUDA=1 skips it; a failed nvcc build
                       is reported and left out (the package works without it; the `cuda` backend says it is
                       missing).

kernels/ (Triton) is installed as the subpackage aigc_rt.kernels: a top-level `kernels` package would
clash with the PyPI package of that name.
"""
import glob
import os
import shutil
import subprocess

from setuptools import Extension, find_packages, setup
from torch.utils import cpp_extension

CUDA_LIBRARY = "aigc_rt._cuda_kernels"
NVCC_FLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static", "-Icsrc", "--threads", "0",
              "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
              "-gencode", "arch=compute_90,code=compute_90"]
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast", "-Wall", "-Wno-unknown-pragmas"]


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    found = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return found if found and os.path.exists(found) else None


def up_to_date(target: str, sources: list[str]) -> bool:
    """Whether target exists and is newer than every source (nvcc has no ninja to tell it; ~2 min a build)."""
    return os.path.exists(target) and all(os.path.getmtime(s) < os.path.getmtime(target) for s in sources)


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's build for aigc_rt._C; nvcc alone for the CUDA library (not a Python extension: no torch flags)."""

    def build_extensions(self):
        cuda = [e for e in self.extensions if e.name == CUDA_LIBRARY]
        self.extensions = [e for e in self.extensions if e.name != CUDA_LIBRARY]
        super().build_extensions()
        for ext in cuda:
            target = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            cmd = [nvcc(), *NVCC_FLAGS, *ext.sources, "-o", target]
            if up_to_date(target, glob.glob("csrc/cuda/*")):
                print(f"{target} is newer than csrc/cuda: not rebuilt", flush=True)
                self.extensions.append(ext)
                continue
            print(" ".join(cmd), flush=True)
            if subprocess.run(cmd).returncode == 0:
                self.extensions.append(ext)  # so that an in-place build copies it too
            else:
                print("warning: the CUDA kernels did not build (above); aigc_rt works without them", flush=True)


def extensions():
    exts = [
        cpp_extension.CppExtension(
            "aigc_rt._C",
            sources=["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    if nvcc() and os.environ.get("AIGC_RT_NO_CUDA") != "1":
        exts.append(Extension(CUDA_LIBRARY, sources=sorted(glob.glob("csrc/cuda/*.cu"))))
    return exts


packages = find_packages(include=["aigc_rt", "aigc_rt.*"]) + ["aigc_rt.kernels"]
setup(
    packages=packages,
    package_dir={"aigc_rt": "aigc_rt", "aigc_rt.kernels": "kernels"},
    package_data={"aigc_rt": ["data/*.safetensors", "data/*.md"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
