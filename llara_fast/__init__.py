"""llara_fast: a fast training engine for LLaRA (EBAE / EBAR, arXiv 2312.15503)."""
__version__ = "0.1.0"

try:  # the pybind11 extension (csrc/); optional so a source checkout still imports
    from llara_fast import _C
except ImportError:
    _C = None
