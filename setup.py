# The native extension llara_fast._C; everything else is declared in pyproject.toml.
# Builds with pybind11 alone: torch is never a build requirement.
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "llara_fast._C",
    sources=["csrc/bindings.cpp", "csrc/packer.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
