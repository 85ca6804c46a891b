"""The C++ extension llara_fast._C, built by setup.py (installed) and by CMakeLists.txt."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_examples, toy_template

import llara_fast
from llara_fast.data.packing import pack_reference

ROOT = Path(__file__).resolve().parents[2]


def test_extension_is_built():
    assert llara_fast._C is not None, "llara_fast._C did not build: run ./scripts/setup.sh"


def test_attn_pairs_matches_python():
    rng = np.random.default_rng(0)
    b = pack_reference(random_examples(rng, [4, 30, 0, 11], 100), toy_template(100), 64)
    assert llara_fast._C.attn_pairs(b.cu_seqlens_q.numpy(), b.cu_seqlens_k.numpy()) == b.attn_pairs()
    with pytest.raises(ValueError, match="fewer keys than queries"):
        llara_fast._C.attn_pairs(np.array([0, 5], dtype=np.int32), np.array([0, 3], dtype=np.int32))


def test_cmake_build(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    import pybind11

    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    so = list(build.glob("_C*.so"))
    assert len(so) == 1
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import _C; "
            "print(_C.attn_pairs(np.array([0, 3, 5]), np.array([0, 3, 8])))")
    out = subprocess.run([sys.executable, "-c", code, str(build)], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "15"  # 3*4/2 + (2*3 + 2*3/2)
