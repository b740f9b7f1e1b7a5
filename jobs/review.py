"""`clipdense review OUT`: a static HTML report of a labeling run (or of a fine-tune) to look at.

The report holds a gallery of `--n` samples (image, class overlay with legend, confidence map,
figures) that sorts and filters in the page, plots of the whole run from its Parquet rows and commit
markers, the failed samples grouped by reason, and the run's config and summary. For a fine-tune's
output it adds the loss and mIoU curves and the teacher's labels beside the student's. It is written
to `OUT/review/` (or `--out DIR`) and opens from disk without a server.
"""

from __future__ import annotations

import argparse

SORTS = "lowest-confidence | highest-confidence | class:NAME | random"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "review",
        help="write an HTML report of a labeling run or a fine-tune",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("output", metavar="OUT", help="a labeling run's or a fine-tune's output (any fsspec URL)")
    parser.add_argument("--n", type=int, default=48, help="samples in the gallery (default 48)")
    parser.add_argument("--sort", default="lowest-confidence", help=f"which samples, in what order: {SORTS}")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sort random (default 0)")
    parser.add_argument(
        "--compare", type=int, default=8, help="images labelled again by a fine-tune's student (default 8)"
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="report folder (default OUT/review)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.review import write_report

    index = write_report(args.output, args.out, n=args.n, sort=args.sort, seed=args.seed, compare=args.compare)
    print(f"report: {index}")
    return 0
