"""Process tuning: the glibc heap settings are applied once and can be switched off."""
import subprocess
import sys

import pytest

CODE = "from llara_fast.runtime import tune_cpu_malloc; a = tune_cpu_malloc(); print(a, tune_cpu_malloc() is a)"


@pytest.mark.parametrize("env,want", [({}, "True True"), ({"LLARA_FAST_MALLOC_TUNE": "0"}, "False True")])
def test_tune_cpu_malloc(env, want):
    import ctypes.util

    if not ctypes.util.find_library("c") or sys.platform != "linux":
        pytest.skip("mallopt is glibc-only")
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, **env})
    assert out.stdout.strip() == want
