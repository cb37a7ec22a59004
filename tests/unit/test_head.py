"""The linear head: its loss and optimiser, class balance, the cross-validated penalty, the temperature."""

from __future__ import annotations

import numpy as np
import pytest

from engine_build.head import (
    DEFAULT_L2_GRID,
    MIN_TEMPERATURE,
    _Standardised,
    class_weights,
    fit_linear_head,
    fit_temperature,
    log_softmax,
    mean_nll,
    stratified_folds,
    train_head,
)
from stream_worker.errors import ConfigError


def blobs(counts: list[int], dim: int, *, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters, one per class, ``spread`` apart along random directions; non-negative
    and offset like pooled ReLU6 features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, spread, (len(counts), dim))
    targets = np.repeat(np.arange(len(counts)), counts)
    features = 3.0 + centres[targets] + rng.normal(0.0, 1.0, (len(targets), dim))
    return features.astype(np.float32), targets


def test_the_gradient_is_the_derivative_of_the_loss() -> None:
    x, y = blobs([5, 3, 4], 6, spread=1.0)
    problem = _Standardised(x.astype(np.float64), y, 3)
    theta = np.random.default_rng(1).normal(0, 0.3, problem.zeros().shape)
    _, grad = problem.loss_and_gradient(theta, 0.1)
    step = 1e-6
    numeric = np.array(
        [
            (
                problem.loss_and_gradient(theta + step * e, 0.1)[0]
                - problem.loss_and_gradient(theta - step * e, 0.1)[0]
            )
            / (2 * step)
            for e in np.eye(len(theta))
        ]
    )
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_the_fit_is_class_balanced() -> None:
    # 200 against 20, overlapping: at the optimum the bias gradient is zero, so the class-weighted
    # mean predicted probability of each class is exactly 1/K, whatever the class sizes.
    x, y = blobs([200, 20], 8, spread=0.5, seed=3)
    head = fit_linear_head(x, y, 2, l2=1e-3)
    probs = np.exp(log_softmax(head.logits(x)))
    weights = class_weights(y, 2)[y]
    np.testing.assert_allclose((weights[:, None] * probs).sum(axis=0) / weights.sum(), [0.5, 0.5], atol=1e-4)
    # So the rare class is found, not drowned by the common one.
    assert np.mean(head.logits(x[y == 1]).argmax(axis=1) == 1) >= 0.7
    assert class_weights(y, 2).tolist() == pytest.approx([220 / 400, 220 / 40])


def test_standardisation_is_folded_into_the_weights() -> None:
    # Features on wildly different scales and offsets give the same predictions: the head
    # standardises them itself and returns weights that act on the raw values.
    x, y = blobs([10, 10, 10], 5, spread=2.0)
    x = x.astype(np.float64)
    scale = np.array([1e-3, 1.0, 50.0, 1e3, 7.0])
    plain = fit_linear_head(x, y, 3, l2=0.01)
    scaled = fit_linear_head(x * scale + 100.0, y, 3, l2=0.01)
    np.testing.assert_allclose(scaled.logits(x * scale + 100.0), plain.logits(x), atol=1e-4)


def test_folds_are_stratified_and_cover_every_row_once() -> None:
    y = np.repeat(np.arange(3), [7, 3, 12])
    folds = stratified_folds(y, 3, seed=5)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    for fold in folds:
        assert set(y[fold].tolist()) == {0, 1, 2}  # every class held out in every fold
    assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    assert [f.tolist() for f in stratified_folds(y, 3, seed=5)] == [f.tolist() for f in folds]


def test_cv_on_separable_features_is_right_on_every_held_out_row() -> None:
    x, y = blobs([12, 9, 15, 6], 64, spread=3.0)
    trained = train_head(x, y, 4)
    assert trained.folds == 5
    assert trained.chosen.accuracy == trained.chosen.balanced_accuracy == 1.0
    assert [s.l2 for s in trained.scores] == sorted(DEFAULT_L2_GRID)
    # The rule: best balanced accuracy, then the lowest log-loss among those.
    best = max(s.balanced_accuracy for s in trained.scores)
    assert trained.chosen.log_loss == min(s.log_loss for s in trained.scores if s.balanced_accuracy == best)
    # Every held-out row right: the temperature sharpens as far as it may, and says so.
    assert trained.temperature == MIN_TEMPERATURE and trained.temperature_at_bound


def test_cv_penalises_a_fit_to_noise() -> None:
    # 40 images, 300 features of which 2 carry the label: the weakest penalty fits the noise.
    rng = np.random.default_rng(7)
    y = np.repeat([0, 1], 20)
    x = rng.normal(0.0, 1.0, (40, 300))
    x[:, :2] += 1.2 * y[:, None]
    trained = train_head(x, y, 2)
    weakest = trained.scores[0]
    assert trained.l2 > weakest.l2
    assert trained.chosen.log_loss < weakest.log_loss
    assert trained.chosen.balanced_accuracy >= weakest.balanced_accuracy
    assert trained.oof_log_loss_calibrated <= trained.oof_log_loss


def test_cv_accuracy_on_random_labels_is_chance() -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(0.0, 1.0, (60, 20))
    y = rng.permutation(np.repeat([0, 1, 2], 20))
    trained = train_head(x, y, 3)
    assert trained.chosen.balanced_accuracy < 0.6
    # Held-out predictions are no better than a guess, so calibration flattens them.
    assert trained.temperature > 1.0


@pytest.mark.parametrize("true_temperature", [0.3, 4.0])
def test_the_temperature_undoes_over_and_under_confidence(true_temperature: float) -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 2.0, (4000, 5))
    probs = np.exp(log_softmax(logits))
    targets = np.array([rng.choice(5, p=p) for p in probs])
    distorted = logits * true_temperature  # what a head with that miscalibration outputs
    temperature = fit_temperature(distorted, targets)
    assert temperature == pytest.approx(true_temperature, rel=0.1)
    assert mean_nll(distorted / temperature, targets) < mean_nll(distorted, targets)


def test_too_few_examples_or_classes_are_refused() -> None:
    x, y = blobs([5, 1], 4, spread=1.0)
    with pytest.raises(ConfigError, match="two classes with two examples each"):
        train_head(x, y, 2)
    with pytest.raises(ConfigError, match="two classes with two examples each"):
        train_head(x[:5], y[:5], 1)
    with pytest.raises(ConfigError, match="do not describe the same rows"):
        train_head(x, y[:3], 2)
