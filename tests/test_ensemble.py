"""Stacking, cross-validation and post-processing (NumPy only: no model, no TensorFlow)."""

import json

import numpy as np
import pytest

from salt_tf import ensemble, metrics, postprocess


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------------------
# The logistic regression and the meta-model.


def test_fit_logistic_recovers_known_weights():
    rng = np.random.default_rng(0)
    true_w, true_b = np.array([1.5, -0.8, 0.4]), -0.3
    x = rng.normal(0.0, 2.0, size=(200_000, 3))
    y = rng.random(len(x)) < _sigmoid(x @ true_w + true_b)
    w, b = ensemble.fit_logistic(x.astype(np.float32), y, l2=0.0)
    np.testing.assert_allclose(w, true_w, atol=0.04)
    assert abs(b - true_b) < 0.04


def test_fit_logistic_solves_the_regularized_optimality_condition():
    """At the optimum of mean log-loss + l2/2 |w|^2 the gradient is zero: X^T(p - y)/P + l2 w = 0 and
    mean(p - y) = 0 for the unpenalized bias (checked independently of the solver's own gradient code)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 4))
    x[:, 3] = x[:, 2]  # collinear features: only the L2 term makes the optimum unique
    y = rng.random(len(x)) < _sigmoid(2 * x[:, 0] - x[:, 1] + 0.5)
    l2 = 0.05
    w, b = ensemble.fit_logistic(x, y, l2=l2)
    residual = _sigmoid(x @ w + b) - y
    np.testing.assert_allclose(x.T @ residual / len(x) + l2 * w, 0.0, atol=1e-8)
    assert abs(residual.mean()) < 1e-8
    assert w[2] == pytest.approx(w[3], abs=1e-8)  # the penalty splits collinear weight evenly
    w0, _ = ensemble.fit_logistic(x, y, l2=0.0)
    assert abs(w[0]) < abs(w0[0])  # and shrinks


def test_fit_logistic_stays_finite_on_separable_data():
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    y = np.array([0, 0, 1, 1])
    w, b = ensemble.fit_logistic(x, y, l2=1e-3)
    assert np.all(np.isfinite(w)) and 1.0 < w[0] < 100.0


def _known_logistic_maps(rng, m=3, n=60, size=24, weights=(1.2, 0.6, -0.4), bias=-0.5):
    """M smooth-ish logit maps per image and labels drawn pixel by pixel from the known logistic model."""
    maps = rng.normal(0.0, 2.0, size=(m, n, size, size))
    maps = np.clip(maps, -6, 6)
    labels = rng.random((n, size, size)) < _sigmoid(np.tensordot(weights, maps, axes=1) + bias)
    return _sigmoid(maps).astype(np.float32), labels


def test_stacker_recovers_the_weights_of_snapshot_logits_and_round_trips_as_json():
    rng = np.random.default_rng(2)
    probabilities, labels = _known_logistic_maps(rng)
    stacker = ensemble.Stacker.fit(probabilities, labels, ["a", "b", "c"], l2=0.0)
    np.testing.assert_allclose(stacker.weights, [1.2, 0.6, -0.4], atol=0.05)
    assert stacker.bias == pytest.approx(-0.5, abs=0.05)

    # The stacked probability is sigmoid(sum_m w_m logit(p_m) + b), checked against NumPy directly.
    p = probabilities.astype(np.float64)
    reference = _sigmoid(np.tensordot(stacker.weights, np.log(p / (1 - p)), axes=1) + stacker.bias)
    np.testing.assert_allclose(stacker.predict(probabilities), reference, atol=1e-6)

    again = ensemble.Stacker.from_dict(json.loads(json.dumps(stacker.to_dict())))
    assert again.models == ["a", "b", "c"]
    np.testing.assert_array_equal(again.predict(probabilities), stacker.predict(probabilities))


def test_ensemble_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    probabilities, labels = _known_logistic_maps(rng, n=10)
    names = ["snapshots/snapshot-1", "snapshots/snapshot-2", "snapshots/snapshot-3"]
    chosen = ensemble.Ensemble(models=[{"name": n, "epoch": i} for i, n in enumerate(names)], tta=["none", "hflip"],
                               combine="stacked", postprocessing=postprocess.PostProcessing(0.4, 10, 30),
                               stacker=ensemble.Stacker.fit(probabilities, labels, names))
    path = str(tmp_path / "ensemble.json")
    chosen.save(path)
    loaded = ensemble.Ensemble.load(path)
    assert loaded.postprocessing == postprocess.PostProcessing(0.4, 10, 30)
    assert loaded.models == chosen.models and loaded.tta == ["none", "hflip"]
    np.testing.assert_array_equal(loaded.masks(probabilities), chosen.masks(probabilities))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not a readable ensemble file"):
        ensemble.Ensemble.load(str(tmp_path / "broken.json"))


# ---------------------------------------------------------------------------------------------------------
# Cross-validation over images.


def _blob_truth(rng, n=40, size=32):
    """Images with one random rectangle of salt (about a third empty)."""
    truth = np.zeros((n, size, size), dtype=bool)
    for k in range(n):
        if rng.random() < 0.35:
            continue
        y, x = rng.integers(0, size // 2, 2)
        h, w = rng.integers(6, size // 2, 2)
        truth[k, y:y + h, x:x + w] = True
    return truth


def _good_and_noise(rng, truth, confidence, spread, noise_range):
    """Probabilities of two snapshots [2,N,H,W]: one informative (`confidence` inside salt, 1 - outside, plus
    Gaussian noise), one uniform noise over `noise_range`."""
    good = np.clip(np.where(truth, confidence, 1 - confidence) + rng.normal(0, spread, truth.shape), 0.01, 0.99)
    noise = rng.uniform(*noise_range, truth.shape)
    return np.stack([good, noise]).astype(np.float32)


def test_cross_validation_predicts_each_fold_without_its_labels():
    rng = np.random.default_rng(4)
    truth = _blob_truth(rng)
    probabilities = _good_and_noise(rng, truth, 0.8, 0.15, (0.01, 0.99))
    folds_of = ensemble.image_folds(truth, 4, seed=0)
    assert sorted(np.unique(folds_of)) == [0, 1, 2, 3]
    first = ensemble.cross_validate(truth, probabilities, folds_of, ["good", "noise"])

    # Flip the labels of fold 0's images: their out-of-fold predictions must not move (the meta-model
    # that predicts them never saw those labels), while the other folds' predictions do.
    changed = truth.copy()
    changed[folds_of == 0] = ~changed[folds_of == 0]
    second = ensemble.cross_validate(changed, probabilities, folds_of, ["good", "noise"])
    np.testing.assert_array_equal(first["stacked_oof"][folds_of == 0], second["stacked_oof"][folds_of == 0])
    assert not np.allclose(first["stacked_oof"][folds_of != 0], second["stacked_oof"][folds_of != 0])


def test_evaluate_learns_to_ignore_a_noise_snapshot_and_beats_the_mean():
    rng = np.random.default_rng(5)
    truth = _blob_truth(rng, n=50)
    probabilities = _good_and_noise(rng, truth, 0.75, 0.1, (0.0, 1.0))
    good = probabilities[0]
    rows, chosen = ensemble.evaluate(truth, probabilities, ["good", "noise"], plain_probabilities=probabilities,
                                     tta=("none", "hflip"), folds=5)
    by_name = {r.name: r for r in rows}
    stacked = by_name["stacked of 2 (tta hflip, out-of-fold)"]
    mean = by_name["mean of 2 (tta hflip)"]
    assert stacked.cv > mean.cv + 0.05
    assert chosen.combine == "stacked"
    w_good, w_noise = chosen.stacker.weights
    assert w_good > 1.0 and abs(w_noise) < 0.1 * w_good
    assert chosen.scores["cv_stacked_postprocessed"] > chosen.scores["cv_mean_postprocessed"]
    # Each model's rows, plain and with TTA, come first; the post-processed rows last.
    assert [r.name for r in rows][:4] == ["good (plain)", "noise (plain)", "good (tta hflip)", "noise (tta hflip)"]
    assert [r.name for r in rows][-2:] == ["mean + postprocessing", "stacked + postprocessing"]
    # The plain rows are the competition metric itself at 0.5 / at the best threshold.
    assert by_name["good (plain)"].at_half == pytest.approx(metrics.competition_metric(truth, good > 0.5))
    assert by_name["good (plain)"].tuned == pytest.approx(metrics.best_threshold(truth, good)[1])


def test_paired_bootstrap_interval_by_hand():
    # Two images with differences +1 and -1: a resampled mean is -1, 0 or +1 with probabilities 1/4, 1/2,
    # 1/4, so the 95% interval is [-1, +1]; a constant difference has no spread at all.
    low, high = ensemble.paired_bootstrap(np.array([1.0, -1.0]), samples=4000)
    assert (low, high) == (-1.0, 1.0)
    assert ensemble.paired_bootstrap(np.full(7, 0.3)) == pytest.approx((0.3, 0.3))
    # n images with differences 0/1: the interval of the mean is close to the normal one, p +- 1.96 se.
    d = (np.arange(400) < 100).astype(float)
    low, high = ensemble.paired_bootstrap(d, samples=4000)
    se = np.sqrt(0.25 * 0.75 / 400)
    assert low == pytest.approx(0.25 - 1.96 * se, abs=0.006) and high == pytest.approx(0.25 + 1.96 * se, abs=0.006)


def test_evaluate_compares_the_choice_with_the_best_single_model():
    rng = np.random.default_rng(7)
    truth = _blob_truth(rng, n=40)
    probabilities = _good_and_noise(rng, truth, 0.75, 0.1, (0.0, 1.0))
    rows, chosen = ensemble.evaluate(truth, probabilities, ["good", "noise"], plain_probabilities=probabilities,
                                     tta=("none", "hflip"), folds=4)
    versus = chosen.scores["vs_best_single"]
    by_name = {r.name: r for r in rows}
    single = [by_name[f"{m} ({v})"] for m in ("good", "noise") for v in ("plain", "tta hflip")]
    assert versus["cv"] == max(r.cv for r in single) and by_name[versus["model"]] in single
    final = by_name[f"{chosen.combine} + postprocessing"].cv
    assert versus["difference"] == pytest.approx(final - versus["cv"])
    low, high = versus["ci95"]
    assert low <= versus["difference"] <= high
    json.dumps(chosen.to_dict())  # stays writable to ensemble.json


def test_error_breakdown_by_hand():
    truth = np.zeros((4, 10, 10), dtype=bool)
    truth[1, :5, :5] = True            # 25% salt: "medium"; predicted empty below (missed)
    truth[2, :, :] = True              # 100% salt: "large"; predicted exactly
    truth[3, 0, :5] = True             # 5% salt: "small"; predicted exactly
    masks = truth.copy()
    masks[0, 9, 9] = True              # one false salt pixel on the empty image 0
    masks[1] = False
    b = ensemble.error_breakdown(truth, masks)
    # Scores per image: 0 (false salt), 0 (missed), 1, 1.
    assert b["all"] == 0.5 and b["empty"] == 0.0 and b["medium"] == 0.0 and b["large"] == 1.0 and b["small"] == 1.0
    assert (b["false_salt_images"], b["missed_images"]) == (1, 1)
    assert b["without_false_salt"] == 0.75     # image 0 cleared: 1, 0, 1, 1
    table = ensemble.format_breakdown([("m", b)]).splitlines()
    assert table[1].split() == ["m", "0.5000", "0.0000", "1.0000", "0.0000", "1.0000", "1", "1", "0.7500",
                                "n/a", "n/a"]  # no probabilities: nothing said of lower thresholds


def test_error_breakdown_rescue_by_hand():
    """The missed images at their best lower threshold, against scores worked out by hand."""
    truth = np.zeros((5, 10, 10), dtype=bool)
    p = np.zeros((5, 10, 10), dtype=np.float32)
    truth[0, :4, :5] = True; p[0, :4, :5] = 0.9         # found at 0.5: score 1, not a missed image
    truth[1, :2, :5] = True; p[1, :2, :5] = 0.3         # missed; exact at 0.02 .. 0.28: 1
    p[1, 5:, 5:] = 0.1                                   # ... and 25 false pixels at 0.02 .. 0.08 (IoU 10/35)
    truth[2, :4, :5] = True; p[2, :4, :4] = 0.2         # missed; 16 of 20 px at 0.02 .. 0.18: IoU 0.8 -> 6/10
    truth[3, 5:, 5:] = True; p[3, :5, :5] = 0.4         # missed; a wrong place at every threshold: 0
    p[4, 0, 0] = 0.45                                    # no salt, empty at 0.5: 1 (and not a missed image)
    b = ensemble.error_breakdown(truth, p > 0.5, p, threshold=0.5)
    # At 0.5: scores 1, 0, 0, 0, 1. Best lower thresholds: image 1 -> 1, image 2 -> 0.6 (IoU 0.8 > 0.5 .. 0.75), 3 -> 0.
    assert b["missed_images"] == 3 and b["all"] == pytest.approx(0.4)
    assert b["rescuable_images"] == 2
    assert b["with_missed_rescued"] == pytest.approx((1 + 1 + 0.6 + 0 + 1) / 5)
    # Below 0.1 only 0.02 .. 0.08 are tried (0.1 itself is not below): image 1 keeps its 25 false pixels (IoU
    # 10/35: 0), image 2 still scores 0.6.
    low = ensemble.error_breakdown(truth, p > 0.5, p, threshold=0.1)
    assert low["rescuable_images"] == 1 and low["with_missed_rescued"] == pytest.approx((1 + 0 + 0.6 + 0 + 1) / 5)
    nothing_below = ensemble.error_breakdown(truth, p > 0.5, p, threshold=0.02)
    assert nothing_below["rescuable_images"] == 0 and nothing_below["with_missed_rescued"] == pytest.approx(0.4)
    none_missed = ensemble.error_breakdown(truth[[0, 4]], p[[0, 4]] > 0.5, p[[0, 4]])
    assert none_missed["rescuable_images"] == 0 and none_missed["with_missed_rescued"] == 1.0


def test_evaluate_with_one_model_says_n_a_for_stacking():
    rng = np.random.default_rng(6)
    truth = _blob_truth(rng, n=20)
    p = np.clip(np.where(truth, 0.7, 0.3) + rng.normal(0, 0.1, truth.shape), 0, 1).astype(np.float32)[None]
    rows, chosen = ensemble.evaluate(truth, p, ["export"], plain_probabilities=p, tta=("none", "hflip"))
    table = ensemble.format_table(rows)
    stacked_lines = [line for line in table.splitlines() if line.startswith("stacked")]
    assert len(stacked_lines) == 2 and all(line.split()[-4:] == ["n/a"] * 4 for line in stacked_lines)
    assert chosen.combine == "mean" and chosen.stacker is None


# ---------------------------------------------------------------------------------------------------------
# Post-processing.


def _hand_mask():
    m = np.zeros((12, 12), dtype=bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True        # a diagonal: ONE 8-connected component of 3 (three 4-connected)
    m[0, 8:10] = m[1, 8:10] = True            # a 2x2 block: 4 pixels
    m[5, 11] = True                           # a single pixel
    m[6:11, 2:7] = True                       # a 5x5 block: 25 pixels
    return m


def test_remove_small_components_uses_8_connectivity():
    mask = _hand_mask()
    kept3 = postprocess.remove_small_components(mask[None], 3)[0]
    expected3 = mask.copy()
    expected3[5, 11] = False                  # only the single pixel is below 3
    np.testing.assert_array_equal(kept3, expected3)

    kept5 = postprocess.remove_small_components(mask[None], 5)[0]
    expected5 = np.zeros_like(mask)
    expected5[6:11, 2:7] = True               # only the 5x5 block has >= 5 pixels
    np.testing.assert_array_equal(kept5, expected5)
    np.testing.assert_array_equal(postprocess.remove_small_components(mask[None], 0)[0], mask)


def test_empty_rule_and_apply():
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, :1, :3] = True    # 3 pixels
    masks[1, :2, :5] = True    # 10 pixels
    out = postprocess.empty_if_small(masks, 5)
    assert not out[0].any()
    np.testing.assert_array_equal(out[1:], masks[1:])

    probabilities = np.zeros((1, 12, 12), np.float32)
    probabilities[0][_hand_mask()] = 0.9
    probabilities[0, 11, 11] = 0.5            # exactly at the threshold: not salt (p > t)
    choice = postprocess.PostProcessing(threshold=0.5, min_component=3, min_salt=40)
    assert not postprocess.apply(probabilities, choice).any()   # 3 + 4 + 25 = 32 < 40 after removal
    choice = postprocess.PostProcessing(threshold=0.5, min_component=3, min_salt=30)
    expected = _hand_mask()
    expected[5, 11] = False
    np.testing.assert_array_equal(postprocess.apply(probabilities, choice)[0], expected)
    assert postprocess.PostProcessing.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice


def test_without_rules_keeps_the_threshold_and_its_score_alone():
    # A choice with every rule on; without them it must mask exactly like "p > threshold" (NumPy by hand) and
    # carry the score the threshold had alone, not the score with the rules.
    choice = postprocess.PostProcessing(threshold=0.3, min_component=50, min_salt=400, min_has_salt=0.9,
                                        scores={"threshold_only": 0.61, "final": 0.64})
    bare = choice.without_rules()
    assert (bare.threshold, bare.min_component, bare.min_salt, bare.min_has_salt) == (0.3, 0, 0, 0.0)
    assert bare.scores == {"threshold_only": 0.61, "final": 0.61}
    probabilities = np.random.default_rng(3).random((4, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(postprocess.apply(probabilities, bare, has_salt=np.zeros(4)), probabilities > 0.3)
    assert not postprocess.apply(probabilities, choice, has_salt=np.zeros(4)).any()


def test_rules_at_their_exact_boundaries():
    # p == threshold is not salt (p > t), a mask of exactly K pixels survives "empty if < K", a component of
    # exactly N pixels survives "remove if < N": each hand-built.
    probabilities = np.full((1, 6, 6), 0.5, np.float32)
    probabilities[0, 0, :2] = 0.51
    masks = postprocess.apply(probabilities, postprocess.PostProcessing(threshold=0.5))
    expected = np.zeros((1, 6, 6), bool)
    expected[0, 0, :2] = True
    np.testing.assert_array_equal(masks, expected)
    four = np.zeros((2, 6, 6), bool)
    four[0, :2, :2] = True                     # exactly 4 pixels
    four[1, :1, :3] = True                     # 3 pixels
    np.testing.assert_array_equal(postprocess.empty_if_small(four, 4), [four[0], np.zeros((6, 6), bool)])
    np.testing.assert_array_equal(postprocess.remove_small_components(four, 4), [four[0], np.zeros((6, 6), bool)])


def test_cv_of_a_single_model_fits_the_threshold_on_the_other_folds_only():
    # Fold 0: salt at 0.7 on 0.3 (any threshold in [0.3, 0.7) is perfect); fold 1: salt at 0.2 on 0.1
    # (perfect only in [0.1, 0.2)). Held out, each fold gets the other's threshold: fold 0 gets 0.18 (the
    # highest perfect one of fold 1, nearest 0.5), so every pixel of its images is salt; fold 1 gets 0.5, so
    # nothing is. Scores by hand: fold 0 images have 16 of 100 pixels salt, IoU 0.16 -> 0; fold 1's salt
    # images predicted empty -> 0. A fit on the held-out fold itself would score 1 everywhere.
    truth = np.zeros((4, 10, 10), bool)
    truth[:, :4, :4] = True
    probabilities = np.where(truth, 0.7, 0.3).astype(np.float32)
    probabilities[2:] = np.where(truth[2:], 0.2, 0.1)
    folds_of = np.array([0, 0, 1, 1])
    row = ensemble.plain_row("m", truth, probabilities, folds_of)
    np.testing.assert_array_equal(row.cv_scores, [0.0, 0.0, 0.0, 0.0])
    assert row.cv == 0.0 and row.at_half == 0.5


def _case(empty_blob, salt_components, n=10, size=40):
    """n empty-truth images with a false positive blob of `empty_blob` pixels, and n salt images whose truth
    is `salt_components` separate squares, predicted exactly; every predicted pixel has probability 0.9, so
    no threshold separates the false blobs from real salt."""
    truth = np.zeros((2 * n, size, size), dtype=bool)
    probabilities = np.full(truth.shape, 0.1, dtype=np.float32)
    if empty_blob:
        side = int(round(np.sqrt(empty_blob)))
        for k in range(n):
            probabilities[k, 2:2 + side, 2:2 + empty_blob // side] = 0.9
    for k in range(n, 2 * n):
        for y, x in salt_components:
            truth[k, y[0]:y[1], x[0]:x[1]] = True
    probabilities[truth] = 0.9
    return truth, probabilities


def test_choose_postprocessing_keeps_the_component_rule_when_it_helps():
    # False positives: 4-pixel specks on empty images; real salt: one 20x20 body.
    truth, probabilities = _case(4, [((5, 25), (5, 25))])
    choice = postprocess.choose_postprocessing(truth, probabilities)
    assert choice.scores["threshold_only"] == pytest.approx(0.5)
    assert choice.min_component == 5 and choice.min_salt == 0      # the smallest N that removes the specks
    assert choice.scores["final"] == pytest.approx(1.0)
    assert metrics.competition_metric(truth, postprocess.apply(probabilities, choice)) == pytest.approx(1.0)


def test_choose_postprocessing_drops_rules_that_hurt():
    # Real salt is made of small bodies (3x3 = 9 pixels) and there are no false positives: every rule hurts.
    truth, probabilities = _case(0, [((2, 5), (2, 5)), ((20, 23), (20, 23))])
    probabilities[:10] = 0.1                                        # empty images predicted empty
    choice = postprocess.choose_postprocessing(truth, probabilities)
    assert choice.min_component == 0 and choice.min_salt == 0
    assert choice.scores["final"] == pytest.approx(1.0)


def test_choose_postprocessing_keeps_only_the_empty_rule_when_only_it_helps():
    # False blobs of 30 pixels on empty images; real salt = three separate 20-pixel bodies (60 in all):
    # removing components <= 30 px also removes the real salt (no gain); emptying masks below K in (30, 60]
    # fixes the empty images and keeps the real ones.
    truth, probabilities = _case(30, [((2, 6), (2, 7)), ((15, 19), (15, 20)), ((30, 34), (2, 7))])
    choice = postprocess.choose_postprocessing(truth, probabilities, component_grid=(10, 25, 40),
                                               empty_grid=(10, 40, 80))
    assert choice.min_component == 0
    assert choice.min_salt == 40
    assert choice.scores["final"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# The image-head gate (deep supervision).


def test_gate_by_hand():
    masks = np.ones((4, 3, 3), dtype=bool)
    has_salt = np.array([0.05, 0.3, 0.31, 0.9])
    out = postprocess.gate(masks, has_salt, 0.31)
    assert [bool(m.any()) for m in out] == [False, False, True, True]  # below t emptied; t itself kept
    np.testing.assert_array_equal(postprocess.gate(masks, None, 0.0), masks)  # off: no head needed
    with pytest.raises(ValueError, match="no image head"):
        postprocess.gate(masks, None, 0.5)
    choice = postprocess.PostProcessing(threshold=0.5, min_has_salt=0.4)
    assert postprocess.PostProcessing.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice
    assert "image head < 0.40" in choice.describe()
    assert postprocess.PostProcessing.from_dict({"threshold": 0.5}).min_has_salt == 0.0  # older ensemble.json


def test_choose_postprocessing_gates_on_the_head_when_it_separates_the_empty_images():
    """False blobs of 30 px on empty images, real salt of three 20 px bodies (the case above); without the
    empty rule only the head can fix the empty images: head 0.2 on them, 0.8 on salt images -> t in (0.2, 0.8]
    scores 1; the smallest such t of the grid is kept. Without a head no gate is tried."""
    truth, probabilities = _case(30, [((2, 6), (2, 7)), ((15, 19), (15, 20)), ((30, 34), (2, 7))])
    has_salt = np.where(truth.reshape(len(truth), -1).any(axis=1), 0.8, 0.2)
    choice = postprocess.choose_postprocessing(truth, probabilities, component_grid=(), empty_grid=(),
                                               has_salt=has_salt, gate_grid=(0.1, 0.2, 0.3, 0.5))
    assert choice.min_has_salt == 0.3
    assert choice.scores["with_empty_rule"] == pytest.approx(0.5)
    assert choice.scores["final"] == pytest.approx(1.0)
    assert metrics.competition_metric(truth, postprocess.apply(probabilities, choice, has_salt)) == pytest.approx(1.0)
    no_head = postprocess.choose_postprocessing(truth, probabilities, component_grid=(), empty_grid=())
    assert no_head.min_has_salt == 0.0 and "with_image_gate" not in no_head.scores


def test_evaluate_uses_the_head_in_cross_validation():
    """False blobs of 100 px on empty images, larger than the real salt (three 20 px bodies): no component or
    empty rule can remove them without the real salt. With the head the cv post-processed score is 1 (each
    fold's gate fitted on the other folds); without it the false blobs stay."""
    truth, probabilities = _case(100, [((2, 6), (2, 7)), ((15, 19), (15, 20)), ((30, 34), (2, 7))], n=20)
    has_salt = np.where(truth.reshape(len(truth), -1).any(axis=1), 0.8, 0.2)
    probs = np.stack([probabilities, probabilities])
    _, with_head = ensemble.evaluate(truth, probs, ["a", "b"], folds=4, has_salt=has_salt)
    _, without = ensemble.evaluate(truth, probs, ["a", "b"], folds=4)
    assert with_head.scores["cv_mean_postprocessed"] == pytest.approx(1.0)
    assert with_head.postprocessing.min_has_salt > 0
    assert without.postprocessing.min_has_salt == 0.0
    assert without.scores["cv_mean_postprocessed"] < 1.0
    np.testing.assert_array_equal(with_head.masks(probs, has_salt), truth)


def _blobs_with_a_noisy_head(seed, n=40, size=16):
    """Half the images hold one square of salt, predicted exactly; the other half are empty with a false
    square of the same kind; the image head is noisy (salt images 0.2..1, empty ones 0..0.8), so whether the
    rules (component removal, gate) chosen on some images help on others depends on the draw."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, size, size), bool)
    probabilities = np.full((n, size, size), 0.1, np.float32)
    for i in range(n):
        r, c = rng.integers(0, size - 8, 2)
        h = int(rng.integers(3, 8))
        truth[i, r:r + h, c:c + h] = bool(i % 2)
        probabilities[i, r:r + h, c:c + h] = 0.9
    salt = truth.reshape(n, -1).any(axis=1)
    has_salt = np.where(salt, rng.uniform(0.2, 1.0, n), rng.uniform(0.0, 0.8, n))
    return truth, np.stack([probabilities, probabilities]), has_salt


@pytest.mark.parametrize("seed, rules_win", [(13, False), (16, False), (14, True), (18, True)])
def test_evaluate_keeps_the_rules_only_when_they_win_by_cv(seed, rules_win):
    """Rules chosen because they gain on all images can lose on held-out folds (draws 13 and 16 of the
    generator: the table's "mean + postprocessing" cv is below the threshold alone). The choice then is the
    threshold alone, and its cv is the threshold row's; where the rules win by cv (14, 18) they are kept."""
    truth, probs, has_salt = _blobs_with_a_noisy_head(seed)
    rows, chosen = ensemble.evaluate(truth, probs, ["a", "b"], folds=4, has_salt=has_salt)
    by_name = {row.name: row for row in rows}
    alone, with_rules = by_name["mean of 2 (tta hflip)"], by_name["mean + postprocessing"]
    assert (with_rules.cv > alone.cv) == rules_win, (with_rules.cv, alone.cv)
    pp = chosen.postprocessing
    if rules_win:
        assert (pp.min_component, pp.min_salt, pp.min_has_salt) != (0, 0, 0.0)
        assert chosen.scores["cv_chosen"] == pytest.approx(with_rules.cv, abs=1e-12)
    else:
        assert (pp.min_component, pp.min_salt, pp.min_has_salt) == (0, 0, 0.0)
        assert pp.threshold == pytest.approx(alone.threshold)
        assert chosen.scores["cv_chosen"] == pytest.approx(alone.cv, abs=1e-12)
        np.testing.assert_array_equal(chosen.masks(probs, has_salt), probs.mean(axis=0) > alone.threshold)
    assert chosen.combine == "mean" or chosen.scores["cv_chosen"] > max(alone.cv, with_rules.cv)
