"""Prediction speed end to end: `predict submit` as a user runs it, its model work against the matmul ceiling.

    python tools/bench_predict.py --model_dir=models/salt-recipe --images=../shared/data/tgs_salt/test/images
    python tools/bench_predict.py --model_dir=... --images=... --tta=none --tta=hflip --allocator=pooled,default --limit=640

For every configuration (a --tta value x a CPU allocator) one child process runs
`python -m salt_tf.predict submit --model_dir=... --images=<the images> --tta=<views>` on the first --limit images
(sorted by id, linked into a temporary folder; all of them by default), one configuration after another, and
reports:

  wall s      the child from start to exit: imports, model restore, reading the PNGs, prediction, the CSV
  predict s   what predict itself reports ("wrote ...: N images in S s"): model calls, post-processing, RLE, CSV
  img/s       images / wall
  GFLOP/s     model work / wall, where model work = the models' forward GFLOP per image (their model.json) x
              views (salt_tf.tta.parse_tta: --tta=hflip is 2, the image and its mirror) x images
  / ceiling   GFLOP/s over TensorFlow's float32 4096² matmul rate, measured in its own child as tools/bench.py
              does: issue 39's figure of prediction efficiency

Allocators: `pooled` is what every salt_tf command uses (TF_CPU_ALLOCATOR_USE_BFC=true, salt_tf.
CPU_ALLOCATOR_VARIABLE, set by salt_tf/__init__.py); `default` is TensorFlow's own (=false). The allocator changes no arithmetic, so the
submissions of one --tta value must be byte-identical across allocators: checked, and the command exits 1 if not.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOCATORS = {"pooled": "true", "default": "false"}
_WROTE = re.compile(r"wrote .*?: (\d+) images .* in ([0-9.]+) s")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="a run, export folder or CV parent (predict's --model_dir)")
    parser.add_argument("--images", required=True, help="a folder of 101x101 PNG images")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images by id (0: all)")
    parser.add_argument("--tta", action="append", help="a predict --tta value (repeatable; default: hflip)")
    parser.add_argument("--allocator", default="pooled", help=f"comma list of {', '.join(ALLOCATORS)}")
    parser.add_argument("--batch_size", type=int, default=64, help="predict's --batch_size")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def ceiling_child(args) -> dict:
    """TensorFlow's float32 4096² matmul rate (as tools/bench.py measures it) and the models' forward GFLOP."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    import timing
    import tensorflow as tf

    from salt_tf import exports, model as model_lib

    gflop = [model_lib.forward_flops_per_image(model_lib.ModelConfig(**e.config["model"])) / 1e9
             for e in exports.find_exports(args.model_dir)]
    return {"matmul_gflops_per_second": timing.tf_matmul_gflops(tf), "forward_gflop_per_image": gflop}


def image_subset(images: str, limit: int, into: str) -> tuple[str, int]:
    """(a folder holding the first `limit` PNGs of `images` by name as symlinks — `images` itself when limit is 0
    — and the number of images in it)."""
    names = sorted(n for n in os.listdir(images) if n.lower().endswith(".png"))
    if not limit:
        return images, len(names)
    os.makedirs(into)
    for name in names[:limit]:
        os.symlink(os.path.abspath(os.path.join(images, name)), os.path.join(into, name))
    return into, min(limit, len(names))


def run_submit(args, images: str, views: str, allocator: str, output: str) -> dict:
    """One `predict submit` child: its wall seconds and the seconds predict reports."""
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC=ALLOCATORS[allocator])
    command = [sys.executable, "-m", "salt_tf.predict", "submit", f"--model_dir={args.model_dir}",
               f"--images={images}", f"--output={output}", f"--tta={views}", f"--batch_size={args.batch_size}"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = _WROTE.search(done.stdout + done.stderr)
    if done.returncode or not found:
        sys.exit(f"bench_predict: {' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return {"views": views, "allocator": allocator, "wall_seconds": wall, "predict_seconds": float(found.group(2))}


def main(argv) -> int:
    args = parse_args(argv)
    args.tta = args.tta or ["hflip"]
    if args.child == "ceiling":
        print("BENCH " + json.dumps(ceiling_child(args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        images, count = image_subset(args.images, args.limit, os.path.join(tmp, "images"))
        rows = []
        for views in args.tta:
            for allocator in args.allocator.split(","):
                row = run_submit(args, images, views, allocator, os.path.join(tmp, f"{views}-{allocator}.csv"))
                rows.append(dict(row, images=count))
                print(f"  {views:12s} {allocator:8s} {row['wall_seconds']:7.1f} s", flush=True)
        first, *others = args.allocator.split(",")
        same = {v: all(filecmp.cmp(os.path.join(tmp, f"{v}-{first}.csv"), os.path.join(tmp, f"{v}-{a}.csv"),
                                   shallow=False) for a in others)
                for v in args.tta}
    child = subprocess.run([sys.executable, os.path.abspath(__file__), f"--model_dir={args.model_dir}",
                            "--images=-", "--child=ceiling"], capture_output=True, text=True, cwd=REPO_ROOT)
    measured = json.loads(next(l[6:] for l in child.stdout.splitlines() if l.startswith("BENCH ")))
    return report(rows, measured, same, args)


def report(rows: list[dict], measured: dict, same: dict, args) -> int:
    """Prints the table, writes --json; 1 if the allocators' submissions differ for a --tta value."""
    from salt_tf import tta  # no TensorFlow at import
    ceiling, gflop = measured["matmul_gflops_per_second"], sum(measured["forward_gflop_per_image"])
    print(f"{len(measured['forward_gflop_per_image'])} model(s), {gflop:.2f} GFLOP forward per image; "
          f"float32 matmul ceiling {ceiling:.1f} GFLOP/s; {rows[0]['images']} images of {args.images}")
    print(f"{'tta':12s} {'allocator':9s} {'wall s':>8s} {'predict s':>9s} {'img/s':>7s} {'GFLOP/s':>8s} {'/ceiling':>8s}")
    for row in rows:
        work = gflop * len(tta.parse_tta(row["views"])) * row["images"]
        row.update(images_per_second=row["images"] / row["wall_seconds"], gflops=work / row["wall_seconds"],
                   of_ceiling=work / row["wall_seconds"] / ceiling)
        print(f"{row['views']:12s} {row['allocator']:9s} {row['wall_seconds']:8.1f} {row['predict_seconds']:9.1f} "
              f"{row['images_per_second']:7.2f} {row['gflops']:8.1f} {row['of_ceiling']:8.2f}")
    for views, identical in same.items():
        print(f"submissions with --tta={views}: {'identical across allocators' if identical else 'DIFFER'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, **measured, "identical": same}, f, indent=1)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
