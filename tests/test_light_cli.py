"""The command line stays light: building the parser and `clipdense config show` load no model
library (torch, open_clip), no Ray, and stay within a small peak RSS, whatever commands are added."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "ray", "pipeline.models", "matplotlib")
MAX_RSS_MB = 250  # the modules config show needs take about 70 MB; torch and open_clip alone take 700+

# Peak RSS from VmHWM, which starts afresh at exec; ru_maxrss would carry over the forking parent's
# size (a pytest process that has loaded torch).
PROBE = """
import json, re, sys, time
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


if __name__ == "__main__":  # the figures: python tests/test_light_cli.py
    print(json.dumps(_probe("config", "show")))
