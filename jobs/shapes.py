"""`clipdense shapes OUT --shards N --per-shard M`: write the ShapeWorld dataset as WebDataset shards."""

from __future__ import annotations

import argparse

from pipeline.data.shapeworld_shards import write_dataset


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "shapes",
        help="write synthetic ShapeWorld shards (images, captions, exact class maps)",
        description="Write OUT/shapes-{000000..}.tar and OUT/vocabulary.json. OUT may be any fsspec URL "
        "(s3://bucket/prefix reads credentials and AWS_ENDPOINT_URL from the environment).",
    )
    parser.add_argument("out", help="output folder URL")
    parser.add_argument("--shards", type=int, required=True, help="number of shards")
    parser.add_argument("--per-shard", type=int, required=True, help="samples per shard")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; sample i of shard s uses (seed, s, i)")
    parser.add_argument(
        "--small-objects", action="store_true", help="every scene has objects covering under 3%% of the image"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    urls = write_dataset(args.out, args.shards, args.per_shard, args.size, args.seed, args.small_objects)
    print(f"wrote {len(urls)} shards of {args.per_shard} samples to {args.out}")
    return 0
