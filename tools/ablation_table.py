"""The ablation table of docs/results.md from finished runs on the same validation split.

    python tools/ablation_table.py runs/ablation/baseline runs/ablation/lovasz_sym ... [--markdown]

The first run is the reference row. For each run: its final model (the end of its cosine cycle, i.e. the
last snapshot; the export/ if it made none) predicts the run's validation images (split.csv) with flip TTA,
as predict does, and the table gives
  @0.5     the competition metric at threshold 0.5
  cv       threshold and post-processing (and, with an image head, the gate) chosen on 4 folds of the images,
           scored on the fifth, every image held out once (salt_tf.ensemble)
  vs ref   the mean per-image difference of the cv scores from the reference row and its paired-bootstrap 95 %
           interval over the images: is a difference larger than the luck of 400 images?
  s/epoch  the fastest epoch of the run (train + validation seconds; slower epochs were shared with other work)
  params, GFLOP forward per image at the network's size
A run with a swa/ export gets a second row for it. All runs must share split.csv (the same images).
"""

from __future__ import annotations

import argparse
import os
import sys


def final_export(run_dir: str) -> str:
    from salt_tf import exports

    entries = exports.find_exports(run_dir)
    return entries[-1].path  # the last snapshot (cosine: the end of the run) or export/


def row(name: str, export_dir: str, data, reference_scores=None, seconds=None) -> dict:
    from salt_tf import ensemble, exports, metrics, model as model_lib, pipeline, tta

    entry = exports.restore(exports.find_exports(export_dir)[0])
    inputs = pipeline.to_arrays(data, entry.use_depth)[0]
    probabilities, has_salt = tta.predict_with_head(entry.model, inputs, batch_size=64)
    truth = data.masks.astype(bool)
    rows, chosen = ensemble.evaluate(truth, probabilities[None], [name], folds=5, has_salt=has_salt)
    cv_scores = next(r.cv_scores for r in rows if r.name == "mean + postprocessing")
    config = model_lib.ModelConfig(**entry.config["model"])
    result = {"name": name, "at_half": metrics.competition_metric(truth, probabilities > 0.5),
              "cv": float(cv_scores.mean()), "cv_scores": cv_scores, "seconds": seconds,
              "params": model_lib.count_params(entry.model),
              "gflop": model_lib.forward_flops_per_image(config) / 1e9,
              "postprocessing": chosen.postprocessing.describe()}
    if has_salt is not None:
        has = truth.reshape(len(truth), -1).any(axis=1)
        result["head_auc"] = metrics.roc_auc(has, has_salt)
    if reference_scores is not None:
        difference = cv_scores - reference_scores
        result["vs_ref"] = (float(difference.mean()), *ensemble.paired_bootstrap(difference))
    return result


def fastest_epoch_seconds(run_dir: str) -> float | None:
    from salt_tf import records

    metrics_rows = records.read_metrics(run_dir)
    if metrics_rows.empty:
        return None
    return float((metrics_rows["train_seconds"] + metrics_rows["eval_seconds"]).min())


def format_rows(rows: list[dict], markdown: bool) -> str:
    header = ["row", "@0.5", "cv", "vs ref (95% CI)", "s/epoch", "params", "GFLOP", "post-processing (cv choice)"]
    lines = []
    for r in rows:
        vs = "—" if "vs_ref" not in r else f"{r['vs_ref'][0]:+.4f} ({r['vs_ref'][1]:+.4f} .. {r['vs_ref'][2]:+.4f})"
        pp = r["postprocessing"] + (f"; head AUC {r['head_auc']:.3f}" if "head_auc" in r else "")
        lines.append([r["name"], f"{r['at_half']:.4f}", f"{r['cv']:.4f}", vs,
                      "—" if r["seconds"] is None else f"{r['seconds']:.0f}", f"{r['params'] / 1e6:.2f} M",
                      f"{r['gflop']:.2f}", pp])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *lines])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories; the first is the reference row")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv[1:])
    from salt_tf import rundir
    from salt_tf.data import kaggle, splits

    split_paths = [os.path.join(run, rundir.SPLIT_FILE) for run in args.runs]
    for path in split_paths:
        if not os.path.isfile(path):
            print(f"error: {path}: not found; pass finished run directories", file=sys.stderr)
            return 2
    split = splits.read_split(split_paths[0])
    val_ids = list(split.loc[split["role"] == "val", "id"])
    for path in split_paths[1:]:
        other = splits.read_split(path)
        if list(other.loc[other["role"] == "val", "id"]) != val_ids:
            print(f"error: {path}: another validation split than {split_paths[0]}; rows must share the images",
                  file=sys.stderr)
            return 2
    data = kaggle.load_labelled(rundir.data_dir(args.runs[0]), val_ids)
    rows, reference = [], None
    for run in args.runs:
        name = os.path.basename(os.path.normpath(run))
        first_new = len(rows)
        result = row(name, final_export(run), data, reference, fastest_epoch_seconds(run))
        reference = result["cv_scores"] if reference is None else reference
        rows.append(result)
        swa_dir = os.path.join(run, rundir.SWA_DIR)
        if rundir.is_export(swa_dir):
            rows.append(row(f"{name} (swa)", swa_dir, data, reference, None))
        print("\n".join(format_rows(rows[first_new:], markdown=False).splitlines()[1:]), flush=True)
    print(format_rows(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
