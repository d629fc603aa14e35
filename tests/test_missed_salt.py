"""tools/missed_salt.py: the missed-salt measures against cases worked out by hand (NumPy only, no TensorFlow)."""

import os

import numpy as np
import pytest

from tool_modules import import_tool

missed_salt = import_tool("missed_salt")


def _two_images():
    """Image 0: salt (a 5x5 block) at probability 0.3, missed at 0.5; image 1: no salt, 0.3 on a 4x4 block."""
    truth = np.zeros((2, 10, 10), bool)
    p = np.zeros((2, 10, 10), np.float32)
    truth[0, :5, :5] = True
    p[0, :5, :5] = 0.3
    p[1, 6:, 6:] = 0.3
    return truth, p


def test_rescue_thresholds_empty_masks_lower_under_the_head_and_size_conditions():
    truth, p = _two_images()
    head = np.array([0.9, 0.1], np.float32)
    both = missed_salt.rescue(truth, p, None, 0.5, 0.2, 0.0, 0)
    assert (both[0] == truth[0]).all() and both[1].sum() == 16           # no head: both rescued
    gated = missed_salt.rescue(truth, p, head, 0.5, 0.2, 0.5, 0)
    assert (gated[0] == truth[0]).all() and gated[1].sum() == 0           # head 0.1 < 0.5: image 1 stays empty
    sized = missed_salt.rescue(truth, p, None, 0.5, 0.2, 0.0, 20)
    assert sized[0].sum() == 25 and sized[1].sum() == 0                   # 16 px < 20: emptied again
    assert missed_salt.rescue(truth, p, None, 0.5, 0.3, 0.0, 0).sum() == 0  # 0.3 > 0.3 is false
    exactly = missed_salt.rescue(truth, p, np.array([0.5, 0.1], np.float32), 0.5, 0.2, 0.5, 25)
    assert exactly[0].sum() == 25 and exactly[1].sum() == 0               # head == g and 25 px == m: both kept


def test_rescue_rules_rank_the_gated_rule_first():
    truth, p = _two_images()
    rows = missed_salt.rescue_rules(truth, p, np.array([0.9, 0.1], np.float32), 0.5)
    # Base scores 0 (missed) and 1 (empty, right). Rescuing both: 1 and 0 -> +0, won 1, lost 1, false salt 1.
    # Rescuing under head >= 0.3 (or 0.5, 0.7): only image 0 -> +0.5, won 1, lost 0.
    best = rows[0]
    assert best["difference"] == pytest.approx(0.5) and (best["won"], best["lost"], best["false_salt"]) == (1, 0, 0)
    assert best["g"] > 0.1 and best["r"] < 0.3 and best["m"] <= 25
    ungated = next(r for r in rows if r["g"] == 0.0 and r["r"] == 0.2 and r["m"] == 0)
    assert ungated["difference"] == pytest.approx(0.0) and (ungated["won"], ungated["lost"]) == (1, 1)
    assert ungated["false_salt"] == 1
    assert all(r["r"] < 0.5 for r in rows) and len(rows) == 7 * 4 * 4
    below = missed_salt.rescue_rules(truth, p, None, 0.2)                 # no head: one g; r only below 0.2
    assert sorted({r["r"] for r in below}) == [0.1, 0.15] and len(below) == 2 * 4


def test_small_masks_sort_each_image_by_hand():
    truth = np.zeros((5, 100, 100), bool)
    p = np.zeros((5, 100, 100), np.float32)
    truth[0, :10, :10] = True                              # 1 % coverage, predicted empty
    truth[1, :10, :10] = True; p[1, 50:60, 50:60] = 0.9     # salt in the wrong place: score 0
    truth[2, :10, :10] = True; p[2, :10, :9] = 0.9          # 90 of 100 px: IoU 0.9 -> 0.5 .. 0.85 hit: 0.8
    p[2, :10, 9] = 0.4                                      # ... exact at a threshold below 0.4
    truth[3, :10, :10] = True; p[3, :10, :10] = 0.9         # exact
    truth[4, :60, :] = True; p[4, :60, :] = 0.9             # 60 %: "large", not counted
    s = missed_salt.small_masks(truth, p, 0.5)
    assert (s["images"], s["empty"], s["wrong_place"], s["partly"], s["exact"]) == (4, 1, 1, 1, 1)
    assert s["score"] == pytest.approx((0 + 0 + 0.8 + 1) / 4)
    assert s["partly_iou_quartiles"] == pytest.approx([0.9, 0.9, 0.9])
    assert s["best_threshold_score"] == pytest.approx((0 + 0 + 1 + 1) / 4)   # image 2 exact at 0.02 .. 0.38


def test_size_thresholds_give_small_predicted_masks_their_own_threshold():
    truth = np.zeros((3, 10, 10), bool)
    p = np.zeros((3, 10, 10), np.float32)
    truth[0, 0, :] = True; p[0, 0, :] = 0.7; p[0, 1, :5] = 0.55   # 15 px at 0.5 (IoU 10/15: 0.4), exact above 0.55
    truth[1, :5, :] = True; p[1, :5, :] = 0.9                     # 50 px, exact at any threshold
    truth[2, :2, :] = True; p[2, :2, :] = 0.3                     # predicted empty: in no band (0 px)
    rows = missed_salt.size_thresholds(truth, p, 0.5, [20, 100])
    assert rows[0] == {"band": 20, "images": 1, "threshold": 0.56, "gain": pytest.approx((1 - 0.4) / 3)}
    assert rows[1]["images"] == 2 and rows[1]["gain"] == pytest.approx(0.6 / 3)  # image 1 loses nothing at 0.56


def test_the_command_on_an_oof_file_and_its_error(tmp_path, capsys):
    from salt_tf import oof

    truth, p = _two_images()
    oof.save(str(tmp_path / "oof.npz"), {
        "ids": np.array(["a", "b"]), "probabilities": p, "masks": truth.astype(np.uint8), "fold": np.array([0, 1]),
        "scores_at_half": np.array([0.0, 1.0]), "scores_cv": np.array([0.0, 1.0]),
        "has_salt": np.array([0.9, 0.1], np.float32)})
    assert missed_salt.main([f"--oof={tmp_path}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("2 images at threshold 0.5: score 0.5000; false salt 0; missed salt 1, of which 1 score at "
                      "some lower threshold (each at its own best: 1.0000 at most)")
    assert out[1] == ("image head, quartiles and 90th percentile: missed salt 0.90 0.90 0.90 0.90; "
                      "true empty 0.10 0.10 0.10 0.10")
    assert out[3].split() == ["r", "0.10", "g", "0.3", "m", "0:", "+0.5000", "won", "1", "lost", "0", "false",
                              "salt", "0"]
    assert len([line for line in out if line.startswith("  r ")]) == 5  # the best changes an image: not repeated
    assert "small masks: none among these images" in out                # the 5x5 block is 25 %: medium
    assert missed_salt.main([f"--oof={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "cv collect" in err[0]


def test_the_command_on_a_run_agrees_with_predict_evaluates_breakdown(tiny_run_1_epoch, tmp_path, capsys):
    """--model_dir predicts the run's validation images as `predict evaluate` does: the same image count, score,
    false-salt and missed counts as evaluate's breakdown row of the TTA model (a separate code path)."""
    import shutil

    from salt_tf import predict
    from salt_tf.data import splits

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run_1_epoch, run)  # evaluate writes ensemble.json into the run
    assert missed_salt.main([f"--model_dir={run}"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert predict.main(["predict", "evaluate", f"--model_dir={run}", "--folds=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines[next(i for i, line in enumerate(lines) if line.startswith("where")):]
               if line.startswith("export (tta hflip)")).split()
    split = splits.read_split(os.path.join(run, "split.csv"))
    n = int((split["role"] == "val").sum())
    assert first.startswith(f"{n} images at threshold 0.5: score {row[3]}; false salt {row[8]}; missed salt {row[9]},")
