"""Input pipeline throughput and metric time.

    python tools/bench_pipeline.py --data_dir=../shared/data/tgs_salt
    python tools/bench_pipeline.py            # on a generated demo set

Prints images/s of the augmented training pipeline alone (no model) and the time to score 400 images with
the competition metric and a 50-threshold sweep. Warm-up excluded; median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="Kaggle layout folder; default: a generated demo set")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--translate", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from salt_tf import tfstart

    tf = tfstart.import_tensorflow()  # the commands' quiet start (no CUDA notices)

    from salt_tf import metrics, pipeline
    from salt_tf.data import kaggle, synthetic

    data_dir = args.data_dir
    if data_dir is None:
        data_dir = os.path.join(tempfile.mkdtemp(), "demo")
        synthetic.generate(data_dir, num_images=800, seed=0)
    start = time.perf_counter()
    data = kaggle.load_labelled(data_dir)
    load_seconds = time.perf_counter() - start
    images, masks = (tf.constant(a) for a in pipeline.to_arrays(data, use_depth=False))
    augmentation = pipeline.Augmentation(hflip=True, translate=args.translate)

    def one_epoch(epoch):
        count = 0
        start = time.perf_counter()
        for x, _ in pipeline.train_dataset(images, masks, batch_size=args.batch_size, seed=0, epoch=epoch,
                                           augmentation=augmentation):
            count += int(x.shape[0])
        return count / (time.perf_counter() - start)

    one_epoch(0)  # warm-up: tracing of the map function
    rates = [one_epoch(e) for e in range(1, args.repeats + 1)]

    rng = np.random.default_rng(0)
    truth = data.masks[:400].astype(bool)
    probabilities = np.clip(truth * 0.7 + rng.random(truth.shape) * 0.5 - 0.1, 0, 1).astype(np.float32)
    metric_times, sweep_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics.competition_metric(truth, probabilities > 0.5)
        metric_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        metrics.threshold_sweep(truth, probabilities, np.linspace(0.02, 0.98, 50))
        sweep_times.append(time.perf_counter() - start)

    results = {
        "images": len(data.ids),
        "load_seconds": round(load_seconds, 3),
        "pipeline_images_per_second": round(statistics.median(rates), 1),
        "metric_400_images_seconds": round(statistics.median(metric_times), 4),
        "sweep_400_images_50_thresholds_seconds": round(statistics.median(sweep_times), 4),
    }
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
