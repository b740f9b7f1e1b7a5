"""`clipdense pretrain-shapes OUT`: train the shipped `shapes-clip` model from scratch on ShapeWorld.

A small open_clip CLIP (the model config JSON, by default the shipped one) learns from ShapeWorld
images and captions with the standard symmetric contrastive loss. The schedule is fixed in steps
(linear warm-up, cosine decay), every batch is a pure function of (seed, step) and the weights start
from `torch.manual_seed(seed)`, so a run repeats on any machine; only its speed differs.

Precision: on CPUs with native bf16 (AVX512-BF16/AMX) the forward and backward run on a bf16 copy
of the model, several times faster than fp32, while AdamW updates an fp32 master copy (bf16 cannot
hold small updates); autocast is not used, it re-casts weights on every op and was measured slower.

OUT receives a shipped-model folder: `config.json`, `weights.safetensors` (fp16), `meta.json` (what
inference needs: recommended `infer` settings, the `background_offset` calibrated under them,
`logit_scale`, `templates`, image size, normalisation), `metrics.json` and `card.md`.

This module holds the command and its config only (`jobs.cli` imports it to build the parser); the
training loop is `jobs.pretrain_shapes_train`, imported when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "pipeline/models/shipped/shapes-clip/config.json"


@dataclass(frozen=True)
class PretrainCfg:
    config: str = str(SHIPPED_CONFIG)  # open_clip model config JSON (embed_dim, vision_cfg, text_cfg)
    steps: int = 3400  # optimiser steps (the schedule is fixed in steps, never in minutes)
    batch_size: int = 256
    lr: float = 2e-3  # peak AdamW learning rate
    warmup: int = 200  # linear warm-up steps, then cosine decay to 0
    weight_decay: float = 0.1  # on matrices only (not gains, biases, embeddings, logit scale)
    seed: int = 0  # model init and every train draw; evaluation uses other seed streams
    precision: str = "auto"  # auto = bf16 on GPUs, on a CPU the faster of fp32 and bf16 as measured
    device: str = "cpu"
    threads: int = 2  # torch CPU threads, and processes rendering the pools
    pool_scenes: int = 60000  # pre-rendered multi-object scenes
    pool_singles: int = 14400  # pre-rendered single-object images (balanced over the 36 classes)
    pool_backgrounds: int = 2000  # pre-rendered empty backgrounds
    log_every: int = 50  # steps between progress lines
    eval_every: int = 0  # steps between quick evaluations (0 = only at the end)
    eval_n: int = 500  # evaluation images per metric
    calibration_n: int = 200  # scenes the background offset is calibrated on (half with small objects)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "pretrain-shapes",
        help="train the small ShapeWorld CLIP (shapes-clip) from scratch",
        description="Train a small open_clip CLIP on ShapeWorld and write a shipped-model folder to OUT.",
    )
    parser.add_argument("out", help="output folder URL")
    defaults = PretrainCfg()
    for f in dataclasses.fields(PretrainCfg):
        comment = _FIELD_HELP.get(f.name, "")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"{comment} (default: %(default)s)",
        )
    parser.set_defaults(func=_run)


_FIELD_HELP = {
    "config": "model config JSON",
    "steps": "optimiser steps",
    "lr": "peak learning rate",
    "warmup": "warm-up steps",
    "precision": "auto, fp32 or bf16",
    "threads": "CPU threads and rendering processes",
    "eval_every": "steps between quick evaluations, 0 = end only",
}


def _run(args: argparse.Namespace) -> int:
    cfg = PretrainCfg(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainCfg)})
    command = "clipdense pretrain-shapes " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    from jobs.pretrain_shapes_train import pretrain  # torch and open_clip: only when the command runs

    metrics = pretrain(cfg, args.out, command)
    print(json.dumps(metrics, indent=1))
    return 0
