"""`clipdense eval`: how good are the labels? mIoU and diagnostics against ground truth, as a table and JSON.

    clipdense eval --truth SHARDS_OR_FOLDER --pred RUN_OUTPUT [--json FILE]
    clipdense eval --truth SHARDS_OR_FOLDER [--head NAME] [--model M] [--pretrained URL] [--config FILE] [k=v ...]
    clipdense eval --truth CALIBRATION_SHARDS [--head NAME] --calibrate-background [k=v ...]

Without `--pred`, a head runs on the fly: `--head`, else the config's `head.name` (unset: the model's
own head, a fine-tuned student's, else maskclip).

`k=v` overrides set the same config keys as the labeling job (e.g. `infer.short_side=448`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys

from jobs.label import with_head_option
from pipeline.config import RunCfg, load_config
from pipeline.eval import counted
from pipeline.eval.truth import TruthSet, open_truth
from pipeline.io import fs
from pipeline.vocab import Vocabulary

RANDOM_INIT = "random_init"
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # a dotted config key and "=", as in infer.short_side=448


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="score label maps against ground truth (mIoU, per class, background, small objects)",
        description="Score a labeling run's output (--pred) or a dense head run on the fly (--head, else the "
        "config's head: the model's own, else maskclip) against "
        "ground truth: shards with seg.png and a vocabulary.json beside them (ShapeWorld), or a VOC-style "
        "folder (JPEGImages/, SegmentationClass/, optional SegmentationObject/, classes.txt).",
    )
    parser.add_argument(
        "--truth", nargs="+", required=True, help="truth shards (list, pattern, glob, folder) or a VOC-style folder"
    )
    parser.add_argument("--vocab", default="", help="class list of the truth (default: found beside it)")
    parser.add_argument("--split", default="", help="VOC-style folder: key list ImageSets/Segmentation/SPLIT.txt")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pred", help="output URL of a labeling run (only committed shards are read)")
    source.add_argument(
        "--head",
        help="run this dense head on the truth images (pipeline.models.heads), replacing a config file's; "
        "without --pred or --head, the config's head.name (unset: the model's own, else maskclip)",
    )
    parser.add_argument("--model", default=None, help="model.name of the head run (default: the config's)")
    parser.add_argument("--pretrained", default=None, help="model.pretrained of the head run (default: the config's)")
    parser.add_argument("--config", default=None, help="run config YAML, as for the labeling job")
    parser.add_argument("--top-k", type=int, default=None, help="classes kept by the top-k diagnostic (default 3)")
    parser.add_argument("--no-random-baseline", action="store_true", help="skip the random-init model baseline")
    parser.add_argument(
        "--zero-shot",
        type=int,
        default=0,
        metavar="N",
        help="also measure image-level zero-shot accuracy on N single-object ShapeWorld scenes",
    )
    parser.add_argument(
        "--calibrate-background",
        action="store_true",
        help="find the vocab.background_offset maximising mIoU on --truth (a calibration split, "
        "never the evaluation split) instead of evaluating",
    )
    parser.add_argument(
        "--offsets",
        default=None,
        metavar="START:STOP:STEP",
        help="background offset shifts tried by --calibrate-background, in cosine units; default "
        "--offsets=-0.5:0.5:0.01 (write it with = when START is negative)",
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON (any fsspec URL)")
    parser.add_argument("overrides", nargs="*", metavar="k=v", help="config overrides, e.g. infer.short_side=448")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # `--truth A B k=v` : argparse hands trailing overrides to --truth; a key=value is never a shard URL.
    args.overrides += [t for t in args.truth if _OVERRIDE.match(t)]
    truth_spec = [t for t in args.truth if not _OVERRIDE.match(t)]
    cfg = load_config(args.config, _overrides(args))
    so = cfg.storage_options or None
    truth = open_truth(truth_spec, args.vocab, args.split, so)
    if args.pred:
        if args.zero_shot or args.calibrate_background:
            raise ValueError(
                "--zero-shot and --calibrate-background need a model: drop --pred (a head runs on the fly)"
            )
        from pipeline.eval.evaluate import evaluate_run_output
        from pipeline.eval.predictions import RunOutputPredictions

        report = evaluate_run_output(truth, RunOutputPredictions(args.pred, so))
        _print_report(report, f"run output {args.pred}")
    else:
        report = _run_head(args, cfg, truth)
    report["unreadable"] = list(truth.unreadable)
    if args.json:
        fs.put_atomic(args.json, json.dumps(report, indent=1).encode(), so)
        print(f"wrote {args.json}")
    for problem in truth.unreadable:  # bad truth samples: one line each; the others were scored
        print(f"clipdense eval: error: {problem} (not scored)", file=sys.stderr)
    return 2 if truth.unreadable else 0


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = [f"model.name={args.model}"] if args.model is not None else []
    extra += [f"model.pretrained={args.pretrained}"] if args.pretrained is not None else []
    return with_head_option(args.head, [*args.overrides, *extra])


def _run_head(args: argparse.Namespace, cfg: RunCfg, truth: TruthSet) -> dict:
    from pipeline.eval.calibrate import DEFAULT_SHIFTS, calibrate_background_offset
    from pipeline.eval.diagnostics import DEFAULT_TOP_K
    from pipeline.eval.evaluate import evaluate_labelers
    from pipeline.models.backbone import model_meta
    from pipeline.stages.infer import DenseLabeler, check_head
    from pipeline.stages.zoom import ZoomLabeler

    so = cfg.storage_options or None
    vocab = _labeler_vocab(cfg, truth.vocab)
    shifts = _shifts(args.offsets) if args.offsets else DEFAULT_SHIFTS  # checked before the model loads
    check_head(cfg, model_meta(cfg.model.name, so))
    labeler = DenseLabeler(cfg, vocab, so)
    if args.calibrate_background:
        report = calibrate_background_offset(labeler, truth, labeler.background_offset, shifts, cfg.infer.batch_size)
        report["model_meta_offset"] = labeler.background_offset - cfg.vocab.background_offset
        _print_calibration(report)
        return report
    baselines = {}
    if not args.no_random_baseline:
        baselines[RANDOM_INIT] = ZoomLabeler(DenseLabeler(_random_init(cfg), vocab, so), cfg.zoom)  # same pipeline
    top_k = DEFAULT_TOP_K if args.top_k is None else args.top_k
    report = evaluate_labelers(truth, ZoomLabeler(labeler, cfg.zoom), baselines, top_k, cfg.infer.batch_size)
    report["predictions"] = {
        "head": labeler.head_name,
        "model": cfg.model.name,
        "pretrained": cfg.model.pretrained,
        "background_offset": labeler.background_offset,
    }
    _print_report(report, f"{labeler.head_name} on {cfg.model.name}")
    if args.zero_shot:
        from pipeline.eval.zeroshot import zero_shot_accuracy

        zs = report["zero_shot"] = zero_shot_accuracy(labeler.backbone, labeler.templates, args.zero_shot)
        print(
            f"\nzero-shot image-level accuracy on {counted(zs['n'], 'single-object ShapeWorld scene')}: "
            f"class {_fmt(zs['accuracy'])}, "
            f"colour {_fmt(zs['colour_accuracy'])}, shape {_fmt(zs['shape_accuracy'])} (chance {_fmt(zs['chance'])})"
        )
    return report


def _shifts(spec: str) -> tuple[float, ...]:
    try:
        start, stop, step = (float(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"--offsets {spec!r} is not START:STOP:STEP (e.g. -0.3:0.3:0.01)") from None
    if step <= 0 or stop < start:
        raise ValueError(f"--offsets {spec!r}: STEP must be positive and STOP at least START")
    count = int(round((stop - start) / step)) + 1
    return tuple(round(start + i * step, 6) for i in range(count))


def _labeler_vocab(cfg: RunCfg, vocab: Vocabulary) -> Vocabulary:
    """The truth's classes, with `vocab.background` words (if set) naming its background class."""
    if cfg.vocab.classes or cfg.vocab.file:
        raise ValueError("eval scores the truth's own classes: do not set vocab.classes or vocab.file (use --vocab)")
    if not cfg.vocab.background:
        return vocab
    if vocab.background is None:
        raise ValueError("vocab.background words were given but the truth vocabulary has no background class")
    names = list(vocab.names)
    names[vocab.background] = tuple(cfg.vocab.background)
    return Vocabulary(tuple(names), vocab.background)


def _random_init(cfg: RunCfg) -> RunCfg:
    """The same config with an untrained model of the same architecture (the recognition floor)."""
    from pipeline.models.backbone import RANDOM_INIT_WEIGHTS

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=RANDOM_INIT_WEIGHTS))


# (column title, key in a summary or in its diagnostics)
_COLUMNS = (
    ("mIoU", "mIoU"),
    ("true-cls", "true_classes"),
    ("top-k", "top_k"),
    ("colour", "colour_mIoU"),
    ("backgr", "background_iou"),
    ("small", "small_object_iou"),
)


def _print_report(report: dict, title: str) -> None:
    print(
        f"{counted(report['n_images'], 'image')} of {report['truth']} ({report['truth_kind']}), "
        f"{counted(len(report['classes']), 'class', 'classes')}"
    )
    print("\nper-class IoU of " + title)
    absent = 0
    confused = report.get("confused_with", {})
    for name, value in report["per_class"].items():
        if value is None:
            absent += 1
        else:
            taken = confused.get(name)
            most = f"   most often taken for {taken['class']} ({taken['share']:.2f})" if taken else ""
            print(f"  {name:<28} {_fmt(value)}{most}")
    if absent:
        print(
            f"  ({counted(absent, 'class', 'classes')} in neither truth nor prediction: not scored, left out of the mean)"
        )
    rows = {"model": report, **report["baselines"]}
    print(f"\n{'':<16}" + "".join(f"{col:>10}" for col, _ in _COLUMNS))
    for name, summary in rows.items():
        cells = []
        for _, key in _COLUMNS:
            value = summary.get(key)
            if value is None and key in ("true_classes", "top_k"):
                value = summary.get("diagnostics", {}).get(key, {}).get("mIoU")
            cells.append(f"{_fmt(value):>10}")
        print(f"{name:<16}" + "".join(cells))
    if "diagnostics" in report:
        print(
            f"(true-cls: argmax over each image's true classes; top-k: over the top {report['diagnostics']['top_k']['k']} "
            "image-level classes + background; colour: classes merged by colour)"
        )


def _print_calibration(report: dict) -> None:
    for offset, miou in report["curve"]:
        print(f"  background offset {offset:+.4f}  mIoU {_fmt(miou)}")
    best, meta = report["background_offset"], report["model_meta_offset"]
    print(
        f"best background offset {best:.4f} (mIoU {_fmt(report['mIoU'])} on "
        f"{counted(report['n_images'], 'calibration image')}): ship it as background_offset in the model's "
        f"meta.json, or run with vocab.background_offset={best - meta:.4f} (the model's meta.json adds {meta:.4f})"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
