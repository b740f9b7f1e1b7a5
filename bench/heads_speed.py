"""Images/s of the dense heads: the batched engine against a batch-1, window-by-window loop, at the same precision.

The engine (`DenseLabeler`) runs the sliding windows of all images of a batch in one forward and
finalizes labels in stripes. The loop does what the official MaskCLIP/SCLIP/NACLIP code does: one
image at a time, one window at a time (batch 1), logits upsampled to the full image size before the
argmax. Both use the same head code on the same random-init model at the same precision, so their
ratio measures batching alone.

Where batching pays: on a GPU, whose thousands of lanes one 224 px window cannot fill. On a CPU one
window's matmuls already keep every core busy, so the two run at about the same rate (measured on 2
cores in fp32: 0.419 and 0.415 img/s). To show how near a CPU run is to its limit, each row also
gives the engine's GFLOP/s (the FLOPs of one image's forward, counted by
`torch.utils.flop_counter`, times img/s) as a fraction of a plain matmul's GFLOP/s in that precision
(`pipeline.models.precision.matmul_gflops`). `--precisions` may include `auto`: the row then shows
what the probe chose, to compare with the fp32 and bf16 rows.

    python bench/heads_speed.py --images 8 --heads maskclip,clip --precisions fp32,bf16,auto

Defaults: random-init ViT-B/16, 480x640 images resized to short side 448, windows 224 / stride 112
(15 windows per image), 20 classes, one prompt template. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import load_config
from pipeline.models.backbone import RANDOM_INIT_WEIGHTS, load_backbone
from pipeline.models.precision import matmul_gflops
from pipeline.stages import windows as win
from pipeline.stages.infer import DenseLabeler
from pipeline.vocab import Vocabulary

CLASSES = (
    "background, aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, table, dog, horse, "
    "motorbike, person, plant, sheep, sofa, train"
).split(", ")


NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def loop_batch1(labeler: DenseLabeler, images: list[np.ndarray]) -> list[np.ndarray]:
    """The official repos' inference: per image, per window, batch 1; full-size logits, then argmax."""
    infer, bb = labeler.infer, labeler.backbone
    out = []
    for image in images:
        x = labeler._to_tensor(image)
        x = labeler._resize(x, labeler._working_size(*x.shape[1:]))
        x = (x - labeler._mean) / labeler._std
        size, windows = win.plan(*x.shape[1:], infer.crop, infer.stride, bb.stride)
        canvas = torch.zeros(labeler.n_classes, *x.shape[1:], device=x.device)
        count = torch.zeros(x.shape[1:], device=x.device)
        for w in windows:
            crop = win.cut(x, [w], size)
            logits = labeler.head(bb, labeler.text, crop)
            up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
            canvas[:, w.y0 : w.y1, w.x0 : w.x1] += up[:, : w.y1 - w.y0, : w.x1 - w.x0]
            count[w.y0 : w.y1, w.x0 : w.x1] += 1
        full = F.interpolate((canvas / count)[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
        out.append(F.softmax(infer.logit_scale * full, dim=0).argmax(dim=0).cpu().numpy())
    return out


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def flops_per_image(labeler: DenseLabeler, image: np.ndarray) -> float:
    """FLOPs of one image's forward through the head (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        labeler.score_maps([image])
    return float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--heads", default="maskclip,clip,sclip,clearclip,naclip")
    p.add_argument("--precisions", default="fp32,bf16,auto")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--size", default="480x640", help="HxW of the synthetic images")
    p.add_argument("--short-side", type=int, default=448)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--stride", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--repeats", type=int, default=1, help="best of this many runs (engine and loop alternate)")
    p.add_argument("--no-loop", action="store_true", help="skip the batch-1 loop")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = map(int, args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    images = [
        np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((height // 8 + 1, width // 8 + 1, 1)))[:height, :width].astype(
            np.uint8
        )
        for _ in range(args.images)
    ]
    vocab = Vocabulary.from_entries(CLASSES, background=0)
    n_windows = len(win.plan(args.short_side, round(width * args.short_side / height), args.crop, args.stride, 1)[1])
    print(
        f"# {args.model} random init, {args.images} images {height}x{width} -> short side {args.short_side}, "
        f"windows {args.crop}/{args.stride} ({n_windows} per image), batch {args.batch_size}, {len(CLASSES)} classes, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(
        f"{'head':<10} {'precision':<10} {'engine img/s':>12} {'loop img/s':>11} {'engine/loop':>11} "
        f"{'GFLOP/s':>8} {'of matmul':>9}"
    )
    rows = []
    for precision in args.precisions.split(","):
        overrides = [
            f"model.name={args.model}",
            f"model.pretrained={RANDOM_INIT_WEIGHTS}",
            f"model.precision={precision}",
            "prompts.templates=single",
            f"infer.short_side={args.short_side}",
            f"infer.crop={args.crop}",
            f"infer.stride={args.stride}",
            f"infer.batch_size={args.batch_size}",
        ]
        cfg = load_config(None, overrides)
        torch.manual_seed(0)
        backbone = load_backbone(cfg.model)
        dtype = NAMES[backbone.dtype]
        matmul = matmul_gflops((dtype,), backbone.device)[dtype]
        for head in args.heads.split(","):
            labeler = DenseLabeler(load_config(None, [*overrides, f"head.name={head}"]), vocab, backbone=backbone)
            labeler(images[:1])  # warm-up
            flops = flops_per_image(labeler, images[0])
            engine_s, loop_s = [], []
            for _ in range(args.repeats):  # alternating, so a busy spell on a shared machine hits both
                engine_s.append(timed(labeler, images))
                if not args.no_loop:
                    loop_s.append(timed(loop_batch1, labeler, images))
            engine = args.images / min(engine_s)
            row = {"head": head, "precision": precision, "dtype": dtype, "engine_img_s": engine}
            row |= {"engine_gflop_s": engine * flops / 1e9, "matmul_gflop_s": matmul}
            row["fraction_of_matmul"] = row["engine_gflop_s"] / matmul
            if loop_s:
                row["loop_img_s"] = args.images / min(loop_s)
                row["engine_over_loop"] = engine / row["loop_img_s"]
            rows.append(row)
            label = precision if precision != "auto" else f"auto={dtype}"
            loop_txt = f"{row['loop_img_s']:11.3f} {row['engine_over_loop']:10.2f}x" if loop_s else f"{'':>23}"
            print(
                f"{head:<10} {label:<10} {engine:12.3f} {loop_txt} {row['engine_gflop_s']:8.1f} "
                f"{row['fraction_of_matmul']:9.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
