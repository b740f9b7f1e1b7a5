"""Peak memory of reading a shard must not grow with the shard: the reader streams, one sample at a time.

Builds shards of about 50 MB and 500 MB of random-noise JPEGs (512×512, the same images in both) in
a temporary folder, then reads each through `iter_samples` in a fresh Python process and prints that
process's peak resident memory. A process that only imports the reader gives the baseline. The check
passes when the two shards' peaks differ by less than 50 MB.

    python bench/read_memory.py [--sizes-mb 50 500] [--side 512] [--dir DIR]

Exit status 0 when the check passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

LIMIT_MB = 50.0


def build_shard(path: Path, size_mb: int, side: int, pool: int = 32) -> int:
    """Write a shard of about `size_mb` MB; returns the number of samples."""
    from pipeline.io.tarwrite import TarShardWriter

    rng = np.random.default_rng(0)
    images = []
    for _ in range(pool):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, "JPEG", quality=90)
        images.append(out.getvalue())
    n = max(1, size_mb * 2**20 // (sum(map(len, images)) // pool))
    with TarShardWriter(str(path)) as writer:
        for i in range(n):
            writer.write(f"{i:06d}", {"jpg": images[i % pool], "txt": b"noise"})
    return n


def read_in_child(url: str | None) -> dict:
    """Run this script with `--read URL` in a fresh interpreter and return its JSON report."""
    cmd = [sys.executable, __file__, "--read", url or ""]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def read(url: str) -> dict:
    """Child side: import the reader, read every sample of `url` (none when empty), report peak RSS."""
    from pipeline.io.read import Sample, iter_samples

    start = time.perf_counter()
    ok = failed = 0
    pixels = 0
    for record in iter_samples(url) if url else ():
        if isinstance(record, Sample):
            ok += 1
            pixels += record.image.shape[0] * record.image.shape[1]
        else:
            failed += 1
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {
        "ok": ok,
        "failed": failed,
        "pixels": pixels,
        "seconds": time.perf_counter() - start,
        "peak_mb": peak_kb / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs=2, default=[50, 500], help="the two shard sizes to compare")
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--dir", help="where to build the shards (default: a temporary folder, removed after)")
    parser.add_argument("--read", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read is not None:
        print(json.dumps(read(args.read)))
        return 0

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base = read_in_child(None)
        print(f"{'shard':>12} {'samples':>8} {'errors':>6} {'read s':>7} {'peak RSS MB':>12}")
        print(f"{'(imports)':>12} {'-':>8} {'-':>6} {'-':>7} {base['peak_mb']:12.1f}")
        peaks = []
        for size_mb in args.sizes_mb:
            path = Path(tmp) / f"noise-{size_mb}mb.tar"
            build_shard(path, size_mb, args.side)
            report = read_in_child(str(path))
            peaks.append(report["peak_mb"])
            actual = f"{path.stat().st_size / 2**20:.0f} MB"
            print(
                f"{actual:>12} {report['ok']:8d} {report['failed']:6d} {report['seconds']:7.1f} {report['peak_mb']:12.1f}"
            )
    diff = abs(peaks[1] - peaks[0])
    verdict = "PASS" if diff < LIMIT_MB else "FAIL"
    print(f"peak RSS difference: {diff:.1f} MB (limit {LIMIT_MB:.0f} MB): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
