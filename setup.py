"""Build aigc_rt and its native extensions.

aigc_rt._C       C++ CPU kernels (csrc/cpu/*.cpp + csrc/bindings.cpp), always built.
aigc_rt._C_cuda  CUDA kernels (csrc/cuda/*.cu), built only where a CUDA toolkit *and* a CUDA build of
                 torch are present (the CPU torch wheel lacks c10/cuda's generated headers).

kernels/ (Triton) is installed as the subpackage aigc_rt.kernels: a top-level `kernels` package would
clash with the PyPI package of that name.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast", "-Wall", "-Wno-unknown-pragmas"]


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
    import torch

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if torch.version.cuda and cpp_extension.CUDA_HOME and cuda_sources and os.environ.get("AIGC_RT_NO_CUDA") != "1":
        exts.append(
            cpp_extension.CUDAExtension(
                "aigc_rt._C_cuda",
                sources=cuda_sources,
                include_dirs=[os.path.abspath("csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            )
        )
    return exts


packages = find_packages(include=["aigc_rt", "aigc_rt.*"]) + ["aigc_rt.kernels"]
setup(
    packages=packages,
    package_dir={"aigc_rt": "aigc_rt", "aigc_rt.kernels": "kernels"},
    package_data={"aigc_rt": ["data/*.safetensors", "data/*.md"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
