"""The command line stays light: building the parser and `clipdense config show` load no model
library (torch, open_clip), no Ray, and stay within a small peak RSS, whatever commands are added.
Every `python -m jobs.X` entry is that command line, so it reports errors as `clipdense X` does."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "ray", "pipeline.models", "matplotlib")
MAX_RSS_MB = 250  # the modules config show needs take about 70 MB; torch and open_clip alone take 700+

# Peak RSS from VmHWM, which starts afresh at exec; ru_maxrss would carry over the forking parent's
# size (a pytest process that has loaded torch).
PROBE = """
import json, re, sys, time
from collections.abc import Iterator
from pathlib import Path
started = time.perf_counter()
from jobs.cli import main
code = main(sys.argv[1:])
heavy = [m for m in {heavy!r} if m in sys.modules]
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
seconds = time.perf_counter() - started
print(json.dumps({{"code": code, "heavy": heavy, "peak_mb": peak_kb / 1024, "seconds": seconds}}))
"""


def _probe(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_config_show_builds_every_command_yet_loads_no_model_library_and_no_ray(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("input: s3://bkt/x-{000..009}.tar\noutput: s3://bkt/out\nstorage_options: {secret: s}\n")
    result = _probe("config", "show", str(config))  # the parser imports every module in jobs.cli.COMMANDS
    assert result["code"] == 0 and result["heavy"] == []
    assert result["peak_mb"] < MAX_RSS_MB


@pytest.mark.parametrize("module", [name for name in COMMANDS if hasattr(importlib.import_module(name), "main")])
def test_every_python_m_entry_is_the_clipdense_command(module, capsys):
    command = module.removeprefix("jobs.").replace("_", "-")
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).main(["--help"])
    assert stopped.value.code == 0 and capsys.readouterr().out.startswith(f"usage: clipdense {command} ")


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_python_m_finetune_reports_an_unreachable_store_in_one_line(tmp_path, unreachable_store):
    """As `clipdense finetune` does: one line naming the endpoint, exit 1, no botocore traceback."""
    done = _run(unreachable_store, "-m", "jobs.finetune", "labels=[s3://qa-bucket/run]", f"output={tmp_path / 'out'}")
    err = done.stderr.strip().splitlines()
    endpoint = unreachable_store["AWS_ENDPOINT_URL"]
    assert done.returncode == 1 and len(err) == 1, done.stderr
    assert err[0].startswith(f"clipdense finetune: error: object store endpoint {endpoint} could not be reached (")


def test_storage_clients_say_where_credentials_came_from_only_under_v(unreachable_store):
    """botocore's INFO line "Found credentials in environment variables" stays off the terminal, above
    the one-line error, unless `-v` asks for more."""
    args = ["-m", "jobs.cli", "config", "show", "s3://qa-bucket/run.yaml"]
    plain = _run(unreachable_store, *args)
    assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert plain.stderr.startswith("clipdense config: error: object store endpoint ")
    verbose = _run(unreachable_store, *args, "-v")
    assert verbose.returncode == 1 and "Found credentials in environment variables" in verbose.stderr


if __name__ == "__main__":  # the figures: python tests/test_light_cli.py
    print(json.dumps(_probe("config", "show")))
