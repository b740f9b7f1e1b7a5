"""Peak memory of `clipdense segment` on a panorama strip must stay close to that of an ordinary image.

Writes a 96x64 scene and strips of 1920x8 and 8x1920 pixels (grey with a red and a blue shape, the
look of the robustness cases) to a temporary folder, then runs `clipdense segment` on each in a
fresh Python process with the shipped model and prints that process's peak resident memory. The
check passes when every strip's peak is within `--limit` (2x) of the ordinary image's.

    python bench/aspect_memory.py [--strips 1920x8 8x1920] [--limit 2.0] [k=v ...]

Config overrides (`infer.crop=32`, `model.name=...`) are passed to every `segment` call. Exit status 0
when the check passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw


def scene(width: int, height: int) -> Image.Image:
    """Grey background, a red disc top-left and a blue square bottom-right."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.1, width * 0.45, height * 0.45), fill=(220, 30, 30))
    draw.rectangle((width * 0.55, height * 0.5, width * 0.9, height * 0.9), fill=(30, 40, 220))
    return image


def segment_in_child(image: Path, out: Path, overrides: list[str]) -> float:
    """Peak RSS in MiB of a fresh process running `clipdense segment` on `image`."""
    code = (
        "import json, resource, sys\n"
        "from jobs.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    args = ["segment", str(image), "--classes", "red circle, blue square, grey background", "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", code, *args, *overrides], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise RuntimeError(f"segment {image} exited {report['rc']}: {done.stderr.strip()[-500:]}")
    return report["peak_mb"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strips", nargs="+", default=["1920x8", "8x1920"], help="strip sizes WIDTHxHEIGHT")
    parser.add_argument(
        "--limit", type=float, default=2.0, help="largest allowed ratio of peak RSS to the normal image's"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides k=v for segment")
    args = parser.parse_args()
    sizes = {"normal 96x64": (96, 64)} | {f"strip {s}": tuple(int(v) for v in s.split("x")) for s in args.strips}
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (width, height) in sizes.items():
            path = Path(tmp) / f"{width}x{height}.png"
            scene(width, height).save(path)
            peaks[name] = segment_in_child(path, Path(tmp) / "out", args.overrides)
    base = peaks["normal 96x64"]
    print(f"{'image':<20} {'peak RSS (MiB)':>15} {'vs normal':>10}")
    for name, peak in peaks.items():
        print(f"{name:<20} {peak:>15.0f} {peak / base:>9.2f}x")
    worst = max(peak / base for peak in peaks.values())
    ok = worst <= args.limit
    print(f"worst ratio {worst:.2f}x, limit {args.limit:.1f}x: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
