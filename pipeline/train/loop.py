"""What every trainer of the project shares: precision, learning-rate schedules, the optimiser step on
an fp32 master copy, memory trimming and progress lines. Used by `clipdense finetune` and
`clipdense pretrain-shapes`.

Precision: on devices with fast bf16 (GPUs, CPUs with AVX512-BF16/AMX; `pipeline.models.precision`) the
forward and backward run on a bf16 copy of the model, several times faster than fp32 on such CPUs,
while the optimiser updates an fp32 master copy (bf16 cannot hold small updates). Autocast is not used:
it re-casts weights on every op and was measured slower on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import logging
import math
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

TRIM_EVERY = 20  # steps between returns of freed heap memory to the OS


def warmup_cosine(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to 0 (open_clip's schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


def warmup_poly(step: int, steps: int, lr: float, warmup: int, power: float = 0.9, min_lr: float = 0.0) -> float:
    """mmseg's poly decay `(lr - min_lr) (1 - step/steps)^power + min_lr`, with its linear warm-up from
    `lr * 1e-6` over `warmup` steps (DenseCLIP's recipe: `warmup_ratio=1e-6` is a ratio)."""
    decayed = (lr - min_lr) * (1 - step / steps) ** power + min_lr
    if step < warmup:
        return decayed * (1 - (1 - step / warmup) * (1 - 1e-6))
    return decayed


class MasterCopy:
    """A model trained in `dtype` with an fp32 master: `work` runs forward and backward, `step` updates
    `master` from `work`'s gradients and copies the new weights back (and `work`'s buffers, e.g.
    BatchNorm statistics, to `master`). With fp32 both are the same module."""

    def __init__(self, master: torch.nn.Module, dtype: torch.dtype) -> None:
        self.master = master
        self.work = master if dtype == torch.float32 else copy.deepcopy(master).to(dtype)

    @torch.no_grad()
    def step(
        self,
        optimizer: torch.optim.Optimizer,
        lrs: list[float],
        grad_clip: float = 0.0,
        post: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        """One optimiser step with per-group learning rates `lrs` (times a group's `lr_mult`); `post(master)`
        runs after it, before the work copy takes the new weights (e.g. to clamp a temperature)."""
        pairs = list(zip(self.master.parameters(), self.work.parameters(), strict=True))
        if self.work is not self.master:
            for p_master, p_work in pairs:
                p_master.grad = None if p_work.grad is None else p_work.grad.float()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p, _ in pairs if p.grad is not None], grad_clip)
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr * group.get("lr_mult", 1.0)
        optimizer.step()
        if post is not None:
            post(self.master)
        if self.work is not self.master:
            for p_master, p_work in pairs:
                p_work.copy_(p_master)
            self.sync_buffers()

    @torch.no_grad()
    def sync_buffers(self) -> None:
        if self.work is not self.master:
            for b_master, b_work in zip(self.master.buffers(), self.work.buffers(), strict=True):
                b_master.copy_(b_work)


class Progress:
    """One log line per interval: step, loss, lr, img/s, ETA. `record` returns the line's values."""

    def __init__(self, steps: int, start_step: int = 0) -> None:
        self.steps, self.start_step = steps, start_step
        self.started = self.tick = time.time()
        self.seen, self.loss_sum, self.paused = 0, 0.0, 0.0

    def add(self, loss: float, images: int) -> None:
        self.seen += images
        self.loss_sum += loss * images

    def pause(self) -> contextlib.AbstractContextManager:
        """Time spent inside (evaluation, checkpoints) is left out of training time and img/s."""
        return _Paused(self)

    @property
    def train_seconds(self) -> float:
        return time.time() - self.started - self.paused

    def record(self, step: int, lr: float) -> dict:
        """Log and return `{"step", "loss", "lr", "img_per_s"}` for the steps since the last record."""
        elapsed = max(1e-9, time.time() - self.tick)
        rate = self.seen / elapsed
        done = step - self.start_step
        eta = self.train_seconds / max(1, done) * (self.steps - step)
        line = {
            "step": step,
            "loss": round(self.loss_sum / max(1, self.seen), 4),
            "lr": lr,
            "img_per_s": round(rate, 1),
        }
        logger.info(
            "step %d/%d loss %.4f lr %.2e img/s %.1f ETA %s",
            step,
            self.steps,
            line["loss"],
            lr,
            rate,
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )
        self.tick, self.seen, self.loss_sum = time.time(), 0, 0.0
        return line


class _Paused(contextlib.AbstractContextManager):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __enter__(self) -> None:
        self.t0 = time.time()

    def __exit__(self, *exc) -> None:
        spent = time.time() - self.t0
        self.progress.paused += spent
        self.progress.tick += spent


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`).

    glibc raises its mmap threshold once large blocks are freed; from then on a training loop's
    activations come from the heap, which keeps growing (measured: about 20 MB a step, 1 GB to 12 GB in
    400 steps, with bf16 weights or the math attention kernel). Trimming every few steps bounds it at no
    measurable cost; trimming every step, or a fixed low mmap threshold, halves the speed (page faults).
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def attention_kernel(device: torch.device) -> contextlib.AbstractContextManager:
    """On CPU, the plain (math) attention: for sequences of tens of tokens its backward was measured about
    1.4x faster than the fused flash kernel's."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
