"""`clipdense review OUT`: a static HTML report of a labeling run (or of a fine-tune) to look at.

The report holds a gallery of `--n` samples (image, class overlay with legend, confidence map,
figures) that sorts and filters in the page, plots of the whole run from its Parquet rows and commit
markers, the failed samples grouped by reason, and the run's config and summary. For a fine-tune's
output it adds the loss and mIoU curves and the teacher's labels beside the student's, on its first
label run or on the one `--label-run N` names. It is written to `OUT/review/` (or `--out DIR`) and
opens from disk without a server.

    clipdense review OUT [--label-run N] [--config FILE] [storage_options.KEY=VALUE ...]

The store is reached with the `storage_options` of `--config` (the labeling or fine-tune config)
and `k=v` overrides, then those recorded in `OUT/_run/config.yaml` for the keys not given: only
what reaches OUT itself (`storage_options.endpoint_url=http://minio:9000`) needs saying.
"""

from __future__ import annotations

import argparse

from jobs.segment import IntermixedParser

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
    parser.add_argument(
        "--label-run", type=int, default=1, metavar="N", help="a fine-tune's label run the gallery shows (default 1)"
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="report folder (default OUT/review)")
    parser.add_argument(
        "--config", default=None, help="the labeling or fine-tune config OUT was written with (its storage_options)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="k=v",
        help="storage_options overrides, e.g. storage_options.endpoint_url=http://minio:9000",
    )
    parser.set_defaults(func=run)
    parser.__class__ = IntermixedParser  # `OUT --n 8 storage_options.endpoint_url=...`: overrides after options


def run(args: argparse.Namespace) -> int:
    from pipeline.review import write_report

    index = write_report(
        args.output,
        args.out,
        n=args.n,
        sort=args.sort,
        seed=args.seed,
        compare=args.compare,
        storage_options=_storage_options(args.config, args.overrides),
        label_run=args.label_run,
    )
    print(f"report: {index}")
    return 0


def _storage_options(config: str | None, overrides: list[str]) -> dict:
    """The `storage_options` of `config` and `overrides`; other keys have no say in a report."""
    from jobs.config_cmd import config_class
    from pipeline.config import ConfigError, load_config

    for item in overrides:
        if not item.startswith("storage_options."):
            raise ConfigError(f"override {item!r}: review takes storage_options.KEY=VALUE overrides only")
    return load_config(config, overrides, cls=config_class(config, overrides)).storage_options
