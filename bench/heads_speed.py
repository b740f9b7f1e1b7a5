"""Images/s of the dense heads: the batched engine against a batch-1, window-by-window loop.

The engine (`DenseLabeler`) runs the sliding windows of all images of a batch in one forward and
finalizes labels in stripes. The loop does what the official MaskCLIP/SCLIP/NACLIP code does: one
image at a time, one window at a time (batch 1), logits upsampled to the full image size before the
argmax. Both use the same head code on the same random-init model, so the ratio measures batching
and precision, not different attention code. The loop runs in fp32, as the official code does.

    python bench/heads_speed.py --images 8 --heads maskclip,clip --precisions fp32,bf16

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

from pipeline.config import load_config
from pipeline.models.backbone import RANDOM_INIT_WEIGHTS, load_backbone
from pipeline.stages import windows as win
from pipeline.stages.infer import DenseLabeler
from pipeline.vocab import Vocabulary

CLASSES = (
    "background, aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, table, dog, horse, "
    "motorbike, person, plant, sheep, sofa, train"
).split(", ")


def loop_batch1(labeler: DenseLabeler, images: list[np.ndarray]) -> list[np.ndarray]:
    """The official repos' inference: per image, per window, batch 1; full-size logits, then argmax."""
    infer, bb = labeler.infer, labeler.backbone
    out = []
    for image in images:
        x = labeler._to_tensor(image)
        x = labeler._resize(x, labeler._working_size(*x.shape[1:]))
        x = (x - labeler._mean) / labeler._std
        size, windows = win.plan(*x.shape[1:], infer.crop, infer.stride, bb.stride)
        canvas = torch.zeros(labeler.n_classes, *x.shape[1:])
        count = torch.zeros(x.shape[1:])
        for w in windows:
            crop = win.cut(x, [w], size)
            logits = labeler.head(bb, labeler.text, crop)
            up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
            canvas[:, w.y0 : w.y1, w.x0 : w.x1] += up[:, : w.y1 - w.y0, : w.x1 - w.x0]
            count[w.y0 : w.y1, w.x0 : w.x1] += 1
        full = F.interpolate((canvas / count)[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
        out.append(F.softmax(infer.logit_scale * full, dim=0).argmax(dim=0).numpy())
    return out


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--heads", default="maskclip,clip,sclip,clearclip,naclip")
    p.add_argument("--precisions", default="fp32,bf16")
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
    print(f"{'head':<10} {'precision':<9} {'engine img/s':>12} {'loop img/s':>11} {'speed-up':>9}")
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
        for head in args.heads.split(","):
            labeler = DenseLabeler(load_config(None, [*overrides, f"head.name={head}"]), vocab, backbone=backbone)
            labeler(images[:1])  # warm-up
            with_loop = not args.no_loop and precision == "fp32"
            engine_s, loop_s = [], []
            for _ in range(args.repeats):  # alternating, so a busy spell on a shared machine hits both
                engine_s.append(timed(labeler, images))
                if with_loop:
                    loop_s.append(timed(loop_batch1, labeler, images))
            row = {"head": head, "precision": precision, "engine_img_s": args.images / min(engine_s)}
            if with_loop:
                row["loop_img_s"] = args.images / min(loop_s)
            rows.append(row)
    loops = {r["head"]: r["loop_img_s"] for r in rows if "loop_img_s" in r}
    for row in rows:
        loop = loops.get(row["head"])
        row["speedup_vs_fp32_loop"] = row["engine_img_s"] / loop if loop else None
        loop_txt = f"{row['loop_img_s']:11.3f}" if "loop_img_s" in row else f"{'':>11}"
        speed = f"{row['speedup_vs_fp32_loop']:8.2f}x" if loop else f"{'':>9}"
        print(f"{row['head']:<10} {row['precision']:<9} {row['engine_img_s']:12.3f} {loop_txt} {speed}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
