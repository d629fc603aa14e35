"""`python -m salt_tf`: the commands of salt_tf, one line each.

Instant on purpose: this module imports nothing (no TensorFlow, no other salt_tf module), so the list is
written out here; tests/test_cli.py checks it against the subcommands salt_tf.predict, salt_tf.runs and
salt_tf.cv define (their names and one-line summaries) and that no `python -m salt_tf.X` entry point is missing.
"""

import sys

COMMANDS = (
    ("python -m salt_tf.train", "train a model into a run directory; the same command resumes it"),
    ("python -m salt_tf.predict submit", "predict a folder of images: the submission CSV (and mask PNGs)"),
    ("python -m salt_tf.predict evaluate", "score the run's models on its validation images (a CV parent: its "
                                           "out-of-fold predictions): the table and ensemble.json"),
    ("python -m salt_tf.runs list", "one line per run under a folder, the flags that differ as columns"),
    ("python -m salt_tf.runs diff", "two runs side by side: flags, code, data, weights, metric curves"),
    ("python -m salt_tf.runs reproduce", "re-run a run from its flags.cfg and compare the weights bit for bit"),
    ("python -m salt_tf.runs release", "copy a finished run's model (or a CV parent's fold ensemble), record, "
                                       "model card and SHA-256 sums into a folder to share"),
    ("python -m salt_tf.cv train", "train the K folds of a flagfile into one parent folder, then collect"),
    ("python -m salt_tf.cv collect", "the out-of-fold predictions and score of a parent's finished folds"),
    ("python -m salt_tf.cv compare", "two cross-validation parents image by image: mean difference, interval"),
    ("python -m salt_tf.cv pseudo", "pseudo-labels: the confident predictions of unlabelled images as a "
                                    "labelled folder"),
    ("python -m salt_tf.competition", "the whole competition pipeline, resumable: folds, OOF, leak-free "
                                      "pseudo-labels, a second round, the choice, the submission, a release"),
    ("python -m salt_tf.sweep run", "one hyperparameter-sweep worker: Optuna trials, each a run directory, until "
                                    "the study's budget is used"),
    ("python -m salt_tf.sweep report", "a sweep's trials table, its best trial's flags as a flagfile, importances, "
                                       "a plot"),
    ("python -m salt_tf.serving", "a run's models as a TensorFlow SavedModel for serving"),
    ("python -m salt_tf.data.synthetic", "write the synthetic demo data set in the Kaggle layout"),
)


def main(argv: list[str]) -> int:
    """Prints the commands (exit status 0); any argument but --help is one line and exit status 2."""
    if len(argv) > 1 and argv[1] not in ("--help", "-h", "--helpfull"):
        print(f"error: python -m salt_tf lists the commands and takes no arguments (got {argv[1]}); run one of "
              "them, e.g. python -m salt_tf.predict submit --help", file=sys.stderr)
        return 2
    width = max(len(command) for command, _ in COMMANDS)
    print("salt_tf: TGS salt segmentation with TensorFlow. Commands (each lists its flags with --help):")
    for command, what in COMMANDS:
        print(f"  {command.ljust(width)}  {what}")
    print("Tools a person runs (benchmarks, profiles, comparisons): python tools/<name>.py, see README.md.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
