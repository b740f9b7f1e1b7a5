"""`clipdense submit --address http://HOST:8265 CONFIG [k=v ...]`: run the labeling job on a Ray cluster.

The config is resolved and checked here (a typo fails before anything is sent), then the job goes to
the cluster through the Ray Jobs API with a runtime environment that carries this package
(`py_modules`) and the resolved config (`working_dir`), so cluster nodes need only Ray and the
dependencies. The command follows the job's logs and exits with the job's status: 0 when it
succeeded, the job's own exit code when it failed, 130 when it was stopped. Ctrl-C stops the job.

A cluster with Ray token authentication needs the token in this shell, exactly as `ray job submit`
does: `RAY_AUTH_MODE=token` and the token in `RAY_AUTH_TOKEN` or `~/.ray/auth_token`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

from jobs.label import check_head_before_start, split_config_args
from pipeline.config import dump_yaml, load_config
from pipeline.outputs import public_config

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
_PACKAGES = ("pipeline", "jobs")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "submit",
        help="submit the labeling job to a running Ray cluster (Ray Jobs API) and follow it",
        description="Submit `clipdense label CONFIG [k=v ...]` to the Ray cluster whose dashboard is at --address, "
        "carrying this package and the resolved config, then follow its logs until it ends.",
    )
    parser.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://head:8265")
    parser.add_argument("config", nargs="?", default=None, help="YAML config file or URL (optional with overrides)")
    parser.add_argument("overrides", nargs="*", metavar="k=v", help="dotted overrides, e.g. infer.batch_size=32")
    parser.add_argument("--overwrite", action="store_true", help="replace an output written with another config")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return once it is submitted")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    file, overrides = split_config_args(args)
    cfg = load_config(file, overrides)
    check_head_before_start(cfg)  # the cluster reads the overrides as a file: checked here
    if not cfg.input or not cfg.output:
        raise ValueError("the config needs `input` and `output` (shard URLs the cluster can read, an output URL)")
    public = public_config(cfg)
    if public.storage_options != cfg.storage_options:
        # The config travels to the cluster as a file: credentials would be stored there in clear.
        logger.warning("credentials in storage_options are not sent; the cluster uses its own (AWS_*, a Secret)")
    client = JobSubmissionClient(args.address)
    with tempfile.TemporaryDirectory(prefix="clipdense-submit-") as folder:
        Path(folder, CONFIG_NAME).write_text(dump_yaml(public))
        entrypoint = f"python -m jobs.label {CONFIG_NAME}" + (" --overwrite" if args.overwrite else "")
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(folder))
    print(f"submitted job {job_id} to {args.address}", flush=True)
    if args.no_wait:
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        print(f"stopping job {job_id}", file=sys.stderr, flush=True)
        client.stop_job(job_id)
        return 130
    return job_exit_code(client, job_id)


def runtime_env(config_folder: str) -> dict:
    """Runtime environment of the job: the config folder as working dir, this package as py_modules."""
    root = Path(__file__).resolve().parents[1]
    return {
        "working_dir": config_folder,
        "py_modules": [str(root / name) for name in _PACKAGES],
        "excludes": ["__pycache__", "*.pyc"],
    }


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def job_exit_code(client, job_id: str, settle_s: float = 30.0) -> int:
    """Exit code for the finished job (the log stream can end a moment before the status is final)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + settle_s
    info = client.get_job_info(job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    print(f"job {job_id}: {info.status}", flush=True)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    if info.status == JobStatus.STOPPED:
        return 130
    if info.message:
        print(info.message, file=sys.stderr)
    return info.driver_exit_code or 1
