"""Device and dtype of the dense engine, chosen at run time.

Why casting and not autocast: on CPUs with AVX512-BF16/AMX, running a model whose *weights* are
bf16 is several times faster than fp32, while `torch.autocast(bfloat16)` re-casts weights on every
op and ends up slower than fp32. So a bf16 run casts the whole model once; the numerically
sensitive steps (attention softmax of the modified last block, normalisation of final features,
logits, probabilities) are computed in fp32 by the heads and the labeler.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` = CUDA when present, else CPU; otherwise any torch device string (`cpu`, `cuda:1`)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"model.device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device {spec!r} asks for CUDA but this machine has no CUDA device")
    return device


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), from /proc/cpuinfo flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on GPUs that support it and on CPUs with native bf16, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            fast = torch.cuda.is_bf16_supported()
        else:
            fast = device.type == "cpu" and cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"model.precision {precision!r} is unknown; use auto, {', '.join(_DTYPES)}")
    if precision == "fp16" and device.type == "cpu":
        logger.warning("fp16 on CPU is slow and less accurate than bf16; prefer model.precision=bf16 or fp32")
    return _DTYPES[precision]
