"""The training loop of `clipdense pretrain-shapes` (see `jobs.pretrain_shapes` for the method).

Imported only when the command runs: it loads torch and open_clip.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import json
import logging
import math
import time

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch.nn.attention import SDPBackend, sdpa_kernel

from jobs.pretrain_shapes import PretrainCfg
from jobs.pretrain_shapes_card import write_card
from jobs.pretrain_shapes_data import TEMPLATE, BatchSampler, render_pool, to_input
from jobs.pretrain_shapes_eval import RECOMMENDED_INFER, evaluate
from pipeline.io import fs
from pipeline.models.precision import resolve_dtype

logger = logging.getLogger(__name__)


def pretrain(cfg: PretrainCfg, out: str, command: str = "") -> dict:
    """Train, calibrate the background offset, evaluate and write the model folder to `out`; returns its metrics."""
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.lr <= 0:
        raise ValueError(f"steps ({cfg.steps}) and lr ({cfg.lr}) must be positive, warmup ({cfg.warmup}) >= 0")
    model_cfg = json.loads(fs.read_text(cfg.config))
    size = int(model_cfg["vision_cfg"]["image_size"])
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    master = open_clip.CLIP(**model_cfg).to(device)
    dtype = _train_dtype(cfg.precision, device)
    work = master if dtype == torch.float32 else copy.deepcopy(master).to(dtype)
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])

    start = time.time()
    pools = [render_pool(kind, n, size, cfg.seed, cfg.threads) for kind, n in _pools(cfg)]
    sample = BatchSampler(*pools, batch_size=cfg.batch_size, seed=cfg.seed)
    logger.info("rendered %s images in %.0fs", "+".join(str(len(p.images)) for p in pools), time.time() - start)

    optimizer = torch.optim.AdamW(_param_groups(master, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    tokens: dict[str, torch.Tensor] = {}
    history, evals = [], []
    tick, seen, loss_sum = time.time(), 0, 0.0
    for step in range(cfg.steps):
        images, captions = sample(step)
        for c in set(captions) - tokens.keys():
            tokens[c] = tokenizer([c])[0]
        text = torch.stack([tokens[c] for c in captions]).to(device)
        with _attention_kernel(device):
            image_features = F.normalize(work.encode_image(to_input(images, dtype).to(device)).float(), dim=-1)
            text_features = F.normalize(work.encode_text(text).float(), dim=-1)
            loss = loss_fn(image_features, text_features, work.logit_scale.float().exp())
            work.zero_grad(set_to_none=True)
            loss.backward()
        _step(master, work, optimizer, _lr(cfg, step))
        if (step + 1) % _TRIM_EVERY == 0:
            _release_freed_memory()
        seen += len(images)
        loss_sum += loss.item() * len(images)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_loss, rate = loss_sum / seen, seen / (time.time() - tick)
            logger.info("step %d/%d loss %.4f lr %.2e img/s %.0f", step + 1, cfg.steps, mean_loss, _lr(cfg, step), rate)
            history.append(
                {"step": step + 1, "loss": round(mean_loss, 4), "img_s": round(rate), "minutes": _minutes(start)}
            )
            tick, seen, loss_sum = time.time(), 0, 0.0
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            paused = time.time()
            result = evaluate(master.eval(), tokenizer, size, cfg.seed, cfg.eval_n, cfg.calibration_n)
            logger.info("step %d eval %s", step + 1, json.dumps(result))
            evals.append({"step": step + 1} | result)
            master.train()
            start, tick = start + time.time() - paused, tick + time.time() - paused  # evaluation is not training time
    train_minutes = _minutes(start)
    master.eval()
    metrics = evaluate(master, tokenizer, size, cfg.seed, cfg.eval_n, cfg.calibration_n) | {
        "train_minutes": train_minutes,
        "steps": cfg.steps,
    }
    logger.info("final eval %s", json.dumps(metrics))
    _write(out, master, model_cfg, metrics, cfg, command, history, evals)
    return metrics


def _pools(cfg: PretrainCfg) -> list[tuple[str, int]]:
    return [("scene", cfg.pool_scenes), ("single", cfg.pool_singles), ("background", cfg.pool_backgrounds)]


def _train_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision {precision!r} is unknown; use auto, fp32 or bf16")
    return resolve_dtype("auto", device)  # measured, as for labeling (pipeline.models.precision)


_TRIM_EVERY = 20


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`).

    glibc raises its mmap threshold once large blocks are freed; from then on this loop's activations
    come from the heap, which keeps growing (measured: about 20 MB a step, 1 GB to 12 GB in 400 steps,
    with bf16 weights or the math attention kernel). Trimming every few steps bounds it at no measurable
    cost; trimming every step, or a fixed low mmap threshold, halves the speed (page faults).
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


def _attention_kernel(device: torch.device) -> contextlib.AbstractContextManager:
    """On CPU, the plain (math) attention: for sequences of tens of tokens its backward was measured about 1.4x
    faster than the fused flash kernel's."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only, as open_clip's trainer does."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("bias")
        (rest if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _lr(cfg: PretrainCfg, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _step(master: torch.nn.Module, work: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
    """One AdamW step on the fp32 master from the work copy's gradients; the work copy then takes the new weights."""
    pairs = list(zip(master.parameters(), work.parameters(), strict=True))
    if work is not master:
        for p_master, p_work in pairs:
            p_master.grad = None if p_work.grad is None else p_work.grad.float()
    torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    master.logit_scale.clamp_(0, math.log(100))
    if work is not master:
        for p_master, p_work in pairs:
            p_work.copy_(p_master)


def _minutes(start: float) -> float:
    return round((time.time() - start) / 60, 2)


def _write(
    out: str, model, model_cfg: dict, metrics: dict, cfg: PretrainCfg, command: str, history: list, evals: list
) -> None:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    fs.put_atomic(fs.join(out, "weights.safetensors"), save_safetensors(state))
    fs.put_json(fs.join(out, "config.json"), model_cfg)
    meta = {
        "background_offset": metrics["background_offset"],
        "infer": RECOMMENDED_INFER,
        "logit_scale": round(float(model.logit_scale.detach().exp()), 2),
        "templates": [TEMPLATE],
        "image_size": int(model_cfg["vision_cfg"]["image_size"]),
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
    }
    fs.put_json(fs.join(out, "meta.json"), meta)
    train = dataclasses.asdict(cfg) | {"config": "config.json", "command": command}
    fs.put_json(fs.join(out, "metrics.json"), {"metrics": metrics, "train": train, "history": history, "evals": evals})
    n_params = sum(v.numel() for v in state.values())
    card = write_card(model_cfg, meta, metrics, dataclasses.asdict(cfg), command, history, evals, n_params)
    fs.put_atomic(fs.join(out, "card.md"), card.encode())
