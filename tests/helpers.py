"""Shared helpers for the Python tests: tolerances, ISA checks and subprocess runs."""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torch_directconv import _C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fp32 block width expected at each level (the bf16 levels run the avx512 fp32 kernels).
ISA_WIDTH = {"avx2": 8, "avx512": 16, "avx512_bf16": 16, "amx": 16}
# The vector ISAs of the fp32 kernels, which name them.
FP32_ISAS = ("avx512", "avx2")
ENV_VARS = (
    "TORCH_DIRECTCONV_ISA",
    "TORCH_DIRECTCONV_VERBOSE",
    "TORCH_DIRECTCONV_JIT_DUMP",
    "TORCH_DIRECTCONV_CACHE_MB",
    "TORCH_DIRECTCONV_SCRATCH_MB",
)


def cpu_has(isa: str) -> bool:
    """Whether this process can run the JIT's `isa` level (the cap can only lower it): the CPU
    offers it and, for amx, the OS granted tile data."""
    return isa in _C.runnable_isa_levels()


def requires_isa(isa: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not cpu_has(isa), reason=f"this CPU lacks {isa} (detected: {_C.detected_isa()})")


requires_jit = pytest.mark.skipif(
    _C.isa() == "none", reason=f"the JIT is off here (detected {_C.detected_isa()}, active {_C.isa()})"
)


# The level this process should run: the cap when one is set, else the best one.
EXPECTED_ISA = os.environ.get("TORCH_DIRECTCONV_ISA") or _C.detected_isa()


def check_expected_isa() -> str:
    """Skips unless the JIT can run EXPECTED_ISA here, then checks that it really does.

    A child started with TORCH_DIRECTCONV_ISA=avx2 thus fails, rather than silently testing
    AVX-512 again, when the cap is ignored.
    """
    import torch_directconv as tdc

    if EXPECTED_ISA not in ISA_WIDTH:
        pytest.skip(f"TORCH_DIRECTCONV_ISA={EXPECTED_ISA}: no JIT to test")
    if not cpu_has(EXPECTED_ISA):
        pytest.skip(f"this CPU lacks {EXPECTED_ISA} (detected {_C.detected_isa()})")
    assert _C.isa() == EXPECTED_ISA
    assert tdc.isa() == EXPECTED_ISA
    assert tdc.vector_width() == ISA_WIDTH[EXPECTED_ISA]
    assert tdc.jit_stats()["isa"] == EXPECTED_ISA
    return EXPECTED_ISA


def run_pytest_under_isa(
    isa: str, path: str, select: str, expect_passed: int | None = None, marker: str = "not slow"
) -> None:
    """Runs `pytest path -k select -m marker` in a child capped to `isa`; every selected test must pass."""
    if EXPECTED_ISA == isa:
        pytest.skip(f"this process already runs under the {isa} cap")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", select, "-m", marker],
        cwd=REPO,
        env=clean_env(TORCH_DIRECTCONV_ISA=isa),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed, describe(proc)
    if expect_passed is not None:
        assert int(passed.group(1)) == expect_passed, describe(proc)
    assert "skipped" not in proc.stdout, describe(proc)


def conv_tol(fan_in: int) -> dict:
    """rtol/atol for fp32 sums of fan_in products of O(1/sqrt(fan_in)) weights and O(1) inputs.

    Summation-order error grows about like sqrt(fan_in) ulps of the partial sums. One missing
    or doubled tap is off by about 1/sqrt(fan_in), far above this for every fan_in we use
    (test_conv2d checks that).
    """
    t = 2e-6 * math.sqrt(fan_in)
    return {"rtol": t, "atol": t}


def ref_conv2d(*args, **kwargs) -> torch.Tensor:
    """F.conv2d on torch's native kernels, with oneDNN switched off.

    torch 2.13's oneDNN brgemm convolution segfaults on some problems the sweeps generate, e.g.
    F.conv2d(torch.randn(2, 33, 10, 2).to(memory_format=torch.channels_last), torch.randn(3, 33, 7, 1),
    torch.randn(3), stride=3, padding=1, dilation=(1, 3)). The native path computes the same
    function and picks the same output memory format.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return torch.nn.functional.conv2d(*args, **kwargs)
    finally:
        torch.backends.mkldnn.enabled = enabled


@contextlib.contextmanager
def torch_native():
    """Runs torch's convolutions, forward and backward, on its native kernels (oneDNN off; see ref_conv2d).

    Autograd picks the backward kernel when backward runs, so reference gradients must be
    computed inside this block too.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """A gradient against torch's: 1e-4 relative, plus 1e-4 of the gradient's largest magnitude (plus one).

    Gradients are sums of up to N * P * Q products (the weight gradient) whose rounding grows
    with the size of the sum; one missing or doubled product is still well above this
    (test_autograd.test_tolerance_catches_one_missing_term checks that).
    """
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    scale = expected.abs().max().item() + 1 if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{msg}: {m}")


def assert_conv_close(actual: torch.Tensor, expected: torch.Tensor, fan_in: int, msg: str = "") -> None:
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, **conv_tol(fan_in), msg=lambda m: f"{msg}: {m}")


def clean_env(**overrides: str) -> dict:
    """The current environment without any TORCH_DIRECTCONV_* variable, plus overrides."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(overrides)
    return env


def run_python(code: str, timeout: float = 300, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with the given TORCH_DIRECTCONV_* variables.

    With check=True a non-zero exit (including a crash by signal) fails the calling test,
    showing the child's output.
    """
    # Children are seeded too: their tensors are the same on every run.
    prologue = "import torch\ntorch.manual_seed(0)\n"
    proc = subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(code)],
        cwd=REPO,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert proc.returncode == 0, describe(proc)
    return proc


def describe(proc: subprocess.CompletedProcess) -> str:
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return (
        f"child process ended with {how}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )


class OpLog(TorchDispatchMode):
    """The names of the directconv ops that run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "directconv":
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))
