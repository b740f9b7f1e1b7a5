"""Device and dtype of the dense engine, chosen at run time.

Why casting and not autocast: running a model whose *weights* are bf16 is several times faster than
fp32 on CPUs with AMX, while `torch.autocast(bfloat16)` re-casts weights on every op and ends up
slower than fp32. So a bf16 run casts the whole model once; the numerically sensitive steps
(attention softmax of the modified last block, normalisation of final features, logits,
probabilities) are computed in fp32 by the heads and the labeler.

Why measured: whether bf16 pays on a CPU is not written in its flags. With AMX it is several times
faster than fp32; with AVX512-BF16 alone (no AMX) a 2048x2048 matmul was measured at 170 GFLOP/s in
bf16 against 318 in fp32, and a ViT-B/16 forward 40% slower. So `auto` on a CPU times a matmul in
each precision (`probe_cpu`, a fraction of a second), keeps the faster (bf16 only when it is clearly
faster: it is the less accurate), and caches the rates per machine (CPU model and flags, torch
version, thread count) in `$CLIPDENSE_CACHE/precision.json` (default `~/.cache/clipdense`). GPUs
keep bf16 where supported (else fp32): their bf16 tensor cores are always the faster.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PROBE_SIZE = 1024  # matmul side: large enough for the kernels a ViT's linear layers use
_PROBE_SECONDS = 0.15  # per precision: the best of as many matmuls as fit
_BF16_MARGIN = 1.05  # bf16 must be this much faster than fp32 to be chosen


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


def probe_cpu() -> dict[str, float]:
    """GFLOP/s of a square fp32 and bf16 matmul on this CPU at torch's thread count (cached, see the
    module docstring): `{"fp32": float, "bf16": float}`. Measured again when the cache is unreadable."""
    return dict(_probe_cpu(torch.get_num_threads()))


@functools.cache
def _probe_cpu(threads: int) -> tuple[tuple[str, float], ...]:
    key, path = _machine_key(threads), _cache_dir() / "precision.json"
    cached = _read_json(path)
    if key in cached:
        logger.info("precision probe (cached in %s): %s GFLOP/s", path, cached[key])
        return tuple(cached[key].items())
    rates = matmul_gflops(("fp32", "bf16"))
    logger.info("precision probe on %s: %s GFLOP/s", key, rates)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_read_json(path), key: rates}, indent=1), encoding="utf-8")
        tmp.replace(path)  # atomic: actors of one machine may probe at the same time
    except OSError as exc:  # a read-only home: measure again next time
        logger.warning("precision probe not cached (%s)", exc)
    return tuple(rates.items())


def matmul_gflops(
    names: tuple[str, ...], device: torch.device | None = None, seconds: float = _PROBE_SECONDS
) -> dict[str, float]:
    """Best GFLOP/s of a square matmul (side `_PROBE_SIZE`) in each precision of `names` on `device`
    (default CPU), over about `seconds` per precision, alternating between them so that a busy spell on
    a shared machine slows them alike."""
    device = device or torch.device("cpu")
    pairs = {name: torch.randn(2, _PROBE_SIZE, _PROBE_SIZE, device=device).to(_DTYPES[name]) for name in names}
    best = dict.fromkeys(names, float("inf"))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for a, b in pairs.values():
        a @ b  # first call: kernel selection and packing buffers
    spent = 0.0
    while spent < seconds * len(names):
        for name, (a, b) in pairs.items():
            sync()
            start = time.perf_counter()
            a @ b
            sync()
            took = time.perf_counter() - start
            best[name], spent = min(best[name], took), spent + took
    return {name: round(2 * _PROBE_SIZE**3 / t / 1e9, 1) for name, t in best.items()}


def _machine_key(threads: int) -> str:
    model, flags = "unknown cpu", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown cpu":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{model} | flags {digest} | torch {torch.__version__} | {threads} threads"


def _cache_dir() -> Path:
    return Path(os.environ.get("CLIPDENSE_CACHE") or Path.home() / ".cache" / "clipdense")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on GPUs that support it; on a CPU the faster of fp32 and bf16 by `probe_cpu`."""
    if precision == "auto":
        if device.type == "cuda":
            fast = torch.cuda.is_bf16_supported()
        elif device.type == "cpu":
            rates = probe_cpu()
            fast = rates["bf16"] > _BF16_MARGIN * rates["fp32"]
            logger.info("model.precision=auto: %s on this CPU (matmul GFLOP/s %s)", "bf16" if fast else "fp32", rates)
        else:
            fast = False
        return torch.bfloat16 if fast else torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"model.precision {precision!r} is unknown; use auto, {', '.join(_DTYPES)}")
    if precision == "fp16" and device.type == "cpu":
        logger.warning("fp16 on CPU is slow and less accurate than bf16; prefer model.precision=bf16 or fp32")
    return _DTYPES[precision]


def describe_precision(requested: str, device: torch.device, dtype: torch.dtype) -> dict:
    """What a run computes in, for its log and summary: `{"requested", "dtype"}`, plus the probe's
    `cpu_matmul_gflops` when `auto` chose on a CPU."""
    out = {"requested": requested, "dtype": str(dtype).removeprefix("torch.")}
    if requested == "auto" and device.type == "cpu":
        out["cpu_matmul_gflops"] = probe_cpu()
    return out
