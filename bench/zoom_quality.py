"""Does zoom-in help? IoU of small objects, overall mIoU and img/s with and without `zoom`, on ShapeWorld.

Writes held-out ShapeWorld scenes with small objects (`--small-objects` scenes, seed `--seed`, apart
from the training seeds) to a temporary folder, then scores the same dense labeler without zoom and
with each zoom variant through the evaluator (`pipeline.eval.evaluate_labelers`, one pass over the
images for all of them). Speed is timed separately, as full labeling (score maps, zoom, label maps)
over the same images after a warm-up batch.

    python bench/zoom_quality.py [--model shapes-clip] [--pretrained URL] [--head maskclip] [--images 300]
        [--size 96] [--seed 7001] [--variants blend=confidence blend=replace,max_regions=8] [--json FILE]
        [k=v ...]

`k=v` are run-config overrides applied to every variant (e.g. `infer.short_side=128`); a variant is a
comma-separated list of `zoom.` keys. Targets: small-object IoU at least +15% relative, mIoU not lower.
Exit status 0 when the best variant meets both, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import yaml

from pipeline.config import RunCfg, ZoomCfg, from_dict, to_dict

SMALL_GAIN_TARGET = 0.15  # relative gain of the mean small-object IoU that zoom-in must bring
BASELINE = "no zoom"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model.name (default: the config's, shapes-clip)")
    parser.add_argument("--pretrained", default=None, help="model.pretrained (default: the model's own weights)")
    parser.add_argument("--head", default=None, help="head.name (default: the config's)")
    parser.add_argument("--config", default=None, help="run config YAML to start from")
    parser.add_argument("--images", type=int, default=300, help="held-out scenes to score")
    parser.add_argument("--size", type=int, default=96, help="scene side in pixels")
    parser.add_argument("--seed", type=int, default=7001, help="ShapeWorld seed of the held-out scenes")
    parser.add_argument("--batch-size", type=int, default=32, help="images per labeler call")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["blend=confidence", "blend=replace", "blend=confidence,protect=false"],
        help="zoom variants, e.g. grid=2,blend=replace",
    )
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="k=v", help="run-config overrides for every variant")
    return parser.parse_args(argv)


def _variant_cfg(cfg: RunCfg, spec: str) -> ZoomCfg:
    """The run's zoom section, enabled, with the variant's `key=value,...` applied."""
    values = to_dict(cfg.zoom) | {"enabled": True}
    for item in filter(None, spec.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"variant {spec!r}: {item!r} is not key=value")
        values[key.strip()] = yaml.safe_load(raw)
    return from_dict(ZoomCfg, values, "zoom")


def _img_per_s(labeler, images: list, batch_size: int) -> float:
    labeler(images[:batch_size])  # warm-up: caches, allocator, text classifier already built
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        labeler(images[start : start + batch_size])
    return len(images) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from pipeline.config import load_config
    from pipeline.data.shapeworld_shards import write_dataset
    from pipeline.eval.evaluate import evaluate_labelers
    from pipeline.eval.truth import open_truth
    from pipeline.stages.infer import DenseLabeler
    from pipeline.stages.zoom import ZoomLabeler

    extra = [f"{k}={v}" for k, v in (("model.name", args.model), ("model.pretrained", args.pretrained)) if v]
    extra += [f"head.name={args.head}"] if args.head else []
    cfg = load_config(args.config, [*args.overrides, *extra])
    with tempfile.TemporaryDirectory(prefix="zoom-bench-") as root:
        write_dataset(root, shards=1, per_shard=args.images, size=args.size, seed=args.seed, small_objects=True)
        truth = open_truth(root)
        labeler = DenseLabeler(cfg, truth.vocab, cfg.storage_options or None)
        variants = {spec: ZoomLabeler(labeler, _variant_cfg(cfg, spec)) for spec in args.variants}
        report = evaluate_labelers(truth, labeler, variants, batch_size=args.batch_size)
        images = [sample.image for sample in truth.samples(images=True)]
    rows = {BASELINE: report} | {spec: report["baselines"][spec] for spec in args.variants}
    speed = {BASELINE: _img_per_s(labeler, images, args.batch_size)}
    speed |= {spec: _img_per_s(zoom, images, args.batch_size) for spec, zoom in variants.items()}
    figures = _figures(rows, speed)
    _print(figures, cfg, args, labeler.backbone.pretrained or "random init", labeler.head_name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "figures": figures, "report": report}, f, indent=1)
    return 0 if any(f["meets_targets"] for name, f in figures.items() if name != BASELINE) else 1


def _figures(rows: dict, speed: dict) -> dict:
    base = rows[BASELINE]
    out = {}
    for name, row in rows.items():
        small, miou = row["small_object_iou"], row["mIoU"]
        gain = (small - base["small_object_iou"]) / base["small_object_iou"] if base["small_object_iou"] else None
        out[name] = {
            "mIoU": miou,
            "small_object_iou": small,
            "small_object_pixel_iou": row["small_object_pixel_iou"],
            "small_object_count": row["small_object_count"],
            "small_gain": gain,
            "img_per_s": round(speed[name], 2),
            "meets_targets": gain is not None and gain >= SMALL_GAIN_TARGET and miou >= base["mIoU"],
        }
    return out


def _print(figures: dict, cfg: RunCfg, args: argparse.Namespace, weights: str, head: str) -> None:
    print(
        f"{args.images} held-out small-object scenes ({args.size} px, seed {args.seed}); model {cfg.model.name} "
        f"(weights: {weights}), head {head}"
    )
    print(f"{'':<36}{'mIoU':>8}{'small':>8}{'small px':>10}{'gain':>8}{'img/s':>9}  targets")
    for name, f in figures.items():
        gain = "-" if f["small_gain"] is None else f"{100 * f['small_gain']:+.1f}%"
        ok = "" if name == BASELINE else ("met" if f["meets_targets"] else "not met")
        print(
            f"{name:<36}{f['mIoU']:>8.3f}{f['small_object_iou']:>8.3f}{f['small_object_pixel_iou']:>10.3f}"
            f"{gain:>8}{f['img_per_s']:>9.1f}  {ok}"
        )


if __name__ == "__main__":
    sys.exit(main())
