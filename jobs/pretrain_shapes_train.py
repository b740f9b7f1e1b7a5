"""The training loop of `clipdense pretrain-shapes` (see `jobs.pretrain_shapes` for the method).

Imported only when the command runs: it loads torch and open_clip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors

from jobs.pretrain_shapes import PretrainCfg
from jobs.pretrain_shapes_card import write_card
from jobs.pretrain_shapes_data import TEMPLATE, BatchSampler, render_pool, to_input
from jobs.pretrain_shapes_eval import RECOMMENDED_INFER, evaluate
from pipeline.io import fs
from pipeline.models.precision import resolve_dtype
from pipeline.train.loop import TRIM_EVERY, MasterCopy, Progress, attention_kernel, release_freed_memory, warmup_cosine

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
    dtype = resolve_dtype(cfg.precision, device)  # auto: measured, as for labeling (pipeline.models.precision)
    trainer = MasterCopy(open_clip.CLIP(**model_cfg).to(device), dtype)
    master, work = trainer.master, trainer.work
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])

    progress = Progress(cfg.steps)  # from here: rendering the pools is training time, evaluations are not
    start = time.time()
    pools = [render_pool(kind, n, size, cfg.seed, cfg.threads) for kind, n in _pools(cfg)]
    sample = BatchSampler(*pools, batch_size=cfg.batch_size, seed=cfg.seed)
    logger.info("rendered %s images in %.0fs", "+".join(str(len(p.images)) for p in pools), time.time() - start)

    optimizer = torch.optim.AdamW(_param_groups(master, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    tokens: dict[str, torch.Tensor] = {}
    history, evals = [], []
    progress.tick = time.time()
    for step in range(cfg.steps):
        images, captions = sample(step)
        for c in set(captions) - tokens.keys():
            tokens[c] = tokenizer([c])[0]
        text = torch.stack([tokens[c] for c in captions]).to(device)
        with attention_kernel(device):
            image_features = F.normalize(work.encode_image(to_input(images, dtype).to(device)).float(), dim=-1)
            text_features = F.normalize(work.encode_text(text).float(), dim=-1)
            loss = loss_fn(image_features, text_features, work.logit_scale.float().exp())
            work.zero_grad(set_to_none=True)
            loss.backward()
        lr = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup)
        trainer.step(optimizer, [lr] * len(optimizer.param_groups), grad_clip=1.0, post=_clamp_logit_scale)
        if (step + 1) % TRIM_EVERY == 0:
            release_freed_memory()
        progress.add(loss.item(), len(images))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            line = progress.record(step + 1, lr)
            history.append(
                {
                    "step": step + 1,
                    "loss": line["loss"],
                    "img_s": round(line["img_per_s"]),
                    "minutes": _minutes(progress),
                }
            )
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            with progress.pause():  # evaluation is not training time
                result = evaluate(master.eval(), tokenizer, size, cfg.seed, cfg.eval_n, cfg.calibration_n)
                logger.info("step %d eval %s", step + 1, json.dumps(result))
                evals.append({"step": step + 1} | result)
                master.train()
    train_minutes = _minutes(progress)
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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only, as open_clip's trainer does."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("bias")
        (rest if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _clamp_logit_scale(master: torch.nn.Module) -> None:
    master.logit_scale.clamp_(0, math.log(100))


def _minutes(progress: Progress) -> float:
    """Training minutes so far (rendering the pools counts, evaluations do not)."""
    return round(progress.train_seconds / 60, 2)


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
