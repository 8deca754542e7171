"""Peak memory of ``vitq eval --method float`` on DeiT-tiny against the number of evaluation images: streamed
evaluation keeps it bounded (the 5,000-image run must stay within 1.3x the 500-image one).

The image folders are hard links of the shipped ``imagenet-sample`` JPEGs (file names made unique, the wnid prefix
kept so the labels still parse) in a temporary folder. Every run is a fresh process, which reports its own peak
resident memory and that of its loader worker processes (``getrusage`` RUSAGE_SELF and RUSAGE_CHILDREN
``ru_maxrss``), so peaks of different runs never mix. Their sum over-counts the memory a forked worker shares with
the main process: an upper bound.

    python benchmarks/stream_memory.py --out benchmarks/results/stream_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from common import comma_list, report_header, write_report

from vitq.assets import IMAGENET_SAMPLE, assets_dir
from vitq.data import IMAGE_EXTENSIONS
from vitq.report.tables import markdown_table

CALIB_SIZE = 8
#: run in a fresh process: ``vitq`` with the given arguments, then its peak memory as one JSON line on stdout
CHILD = """
import json, resource, sys
from vitq.cli import main
code = main(sys.argv[1:])
usage = {"code": code, "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
         "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
print("PEAK " + json.dumps(usage))
"""


def image_folder(folder: Path, n: int) -> Path:
    """``n`` images in ``folder``: hard links (symbolic links across file systems) of the sample images, the k-th
    copy of ``<wnid>_<name>.JPEG`` named ``<wnid>_<name>_<k>.JPEG``."""
    sources = sorted(p for p in (assets_dir() / IMAGENET_SAMPLE).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    folder.mkdir(parents=True)
    for i in range(n):
        source = sources[i % len(sources)]
        target = folder / f"{source.stem}_{i // len(sources)}{source.suffix}"
        try:
            os.link(source, target)
        except OSError:
            target.symlink_to(source)
    return folder


def measure(data: Path, json_path: Path, extra: list[str]) -> tuple[list[str], dict, dict]:
    """The ``vitq`` arguments, the peak memory of a fresh process running them, and their JSON record."""
    args = ["eval", "--method", "float", "--data", str(data), "--calib-size", str(CALIB_SIZE), "--no-progress",
            "--json", str(json_path), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, check=False)
    peak = next((json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("PEAK ")), None)
    if done.returncode != 0 or peak is None or peak["code"] != 0:
        sys.exit(f"vitq {shlex.join(args)} failed:\n{done.stderr}")
    return args, peak, json.loads(json_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=comma_list(int), default="500,5000", help="evaluation images per run")
    parser.add_argument("--workers", type=int, help="vitq --workers (default: vitq's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_memory.md"))
    args = parser.parse_args()
    extra = [] if args.workers is None else ["--workers", str(args.workers)]

    rows, commands, first = [], [], None
    with tempfile.TemporaryDirectory(prefix="vitq-stream-") as tmp:
        for n in args.sizes:
            data = image_folder(Path(tmp) / f"images{n}", n + CALIB_SIZE)
            vitq_args, peak, record = measure(data, Path(tmp) / f"eval{n}.json", extra)
            total = (peak["self_kib"] + peak["children_kib"]) * 1024 / 1e6
            first = first or total
            commands.append("vitq " + shlex.join(a if a != str(data) else f"DIR{n}" for a in vitq_args
                                                 if a != str(Path(tmp) / f"eval{n}.json")))
            rows.append([record["n_images"], f"{peak['self_kib'] * 1024 / 1e6:.0f}",
                         f"{peak['children_kib'] * 1024 / 1e6:.0f}", f"{total:.0f}", f"{total / first:.2f}",
                         f"{record['top1']:.2f}", f"{record['images_per_s']:.1f}"])
            print(f"{n} images: peak {total:.0f} MB", flush=True)
    write_report(args.out, [
        *report_header(
            "Peak memory of a streamed evaluation: DeiT-tiny float",
            f"- each run: `{commands[0].replace('DIR' + str(args.sizes[0]), 'DIR')}` in a fresh process "
            "(`--json` to a temporary file), DIR a folder of the given number of evaluation images plus "
            f"{CALIB_SIZE} calibration images: hard links of the {IMAGENET_SAMPLE} JPEGs",
            "- peak MB: `ru_maxrss` of the process (main) plus that of its largest loader worker (workers); "
            "their sum over-counts the pages a forked worker shares with the main process"),
        markdown_table(["images", "main MB", "workers MB", "peak MB", "ratio to first", "top-1 %", "images/s"],
                       rows),
        "",
    ])


if __name__ == "__main__":
    main()
