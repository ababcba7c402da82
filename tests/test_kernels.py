"""The tests marked `blas` pass whichever kernels OpenBLAS runs and however many threads.

OpenBLAS picks its kernels by processor (SkylakeX, Haswell, Zen, ...) and some machines
force one with OPENBLAS_CORETYPE; each rounds a product's last bits its own way. A test
that compared scores of a batch with those of one user by `==` passed on SkylakeX and
failed on Haswell, Zen and Nehalem. Here the BLAS-sensitive tests run again under another
kernel and thread count, so a new exact comparison across shapes fails on any
machine, not only on the next user's.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# The SSE-only kernel, on two threads: it rounds unlike the AVX2 (Haswell, Zen) and
# AVX-512 (SkylakeX) kernels a current x86 processor picks by itself, and the split of a
# product between threads changes its rounding too. The AVX2 kernel is the whole suite's
# second run (`OPENBLAS_CORETYPE=Haswell make test`, docs/testing.md); a run of it
# here as well took 40 s of the suite's 12 minutes.
RUNS = [("Nehalem", 2)]


def blas_kernel(env: dict[str, str]) -> str:
    """The kernel numpy's OpenBLAS runs with `env`, as threadpoolctl reads it."""
    probe = (
        "import numpy, threadpoolctl;"
        "print([i['architecture'] for i in threadpoolctl.threadpool_info()"
        " if i['internal_api'] == 'openblas'][0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the kernels named are x86's")
@pytest.mark.parametrize("kernel, threads", RUNS)
def test_blas_sensitive_tests_pass_under_another_kernel(kernel, threads):
    env = {
        **os.environ,
        "OPENBLAS_CORETYPE": kernel,
        "OPENBLAS_NUM_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    assert blas_kernel(env) == kernel, "OpenBLAS did not take OPENBLAS_CORETYPE"
    # Only the files that hold such tests: collecting every module (Serve, Tune) took a
    # third of each run.
    files = [str(f) for f in sorted(TESTS.glob("test_*.py")) if "mark.blas" in f.read_text()]
    assert files, "no test is marked blas"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "blas", *files],
        env=env,
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"under {kernel}, {threads} thread(s):\n{run.stdout[-4000:]}"
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-500:]
