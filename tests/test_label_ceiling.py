"""scripts/label_ceiling.py: the simulated recogniser's F1 ceiling of AU occurrence labels."""

from __future__ import annotations

import numpy as np

from avatar_stream.training.au_table import OCCURRENCE_THRESHOLDS


def test_ceiling_is_low_only_where_intensities_sit_at_the_threshold(load_script):
    lc = load_script("label_ceiling")
    thr = np.asarray(OCCURRENCE_THRESHOLDS)
    rng = np.random.default_rng(1)
    n = 20000
    crisp = np.where(rng.random((n, 5)) < 0.3, thr + 0.3, 0.0)  # on well past the threshold, or off
    blurred = thr + rng.normal(0.0, 0.03, (n, 5))  # hovering at the threshold
    np.testing.assert_array_equal(lc.ceiling(crisp, 0.0, rng), np.ones(5))
    assert (lc.ceiling(crisp, 0.05, rng) > 0.99).all()
    assert (lc.ceiling(blurred, 0.05, rng) < 0.8).all()


def test_bad_corpus_is_a_one_line_error(tmp_path, capsys, load_script):
    assert load_script("label_ceiling").main(["--data", str(tmp_path / "missing")]) == 2
    assert "label_ceiling:" in capsys.readouterr().err
