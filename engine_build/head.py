"""A linear softmax head on fixed features: class-balanced, L2-regularised, its penalty chosen by
stratified cross-validation, then calibrated with one temperature. Pure numpy, clock-free.

The objective, for features ``x_i`` standardised on the rows being fitted, labels ``y_i`` in
``0..K-1`` and class weights ``w_c = n / (K * n_c)`` (every class weighs as much in total)::

    L(W, b) = sum_i w[y_i] * -log softmax(W x_i + b)[y_i] / n  +  (l2 / 2) * ||W||^2

It is smooth and strictly convex in ``W``, so full-batch L-BFGS finds its minimum; the bias is
not penalised. The standardisation is folded into the returned weights, which act on raw
features: ``logits = features @ weight.T + bias``.

The penalty is chosen on ``DEFAULT_L2_GRID`` by stratified k-fold cross-validation with
``k = min(5, smallest class count)``: the best out-of-fold *balanced* accuracy wins (the head
is trained class-balanced, so a rare label counts as much as a common one), ties going to the
lower out-of-fold class-weighted log-loss. Accuracy alone ties often on small folders (every
penalty is right on every held-out image); the log-loss then prefers the penalty whose held-out
predictions are right *and* confident.

The temperature ``T`` minimises the mean negative log-likelihood of those out-of-fold logits
divided by ``T`` (the held-out predictions of the chosen penalty: the folds never saw them).
It is searched in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``; the likelihood is convex in ``1/T``,
so bisection on its derivative finds it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_worker.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DEFAULT_L2_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Penalties tried (about half a decade apart), on the mean loss of standardised features."""
MAX_FOLDS = 5
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
MAX_ITERATIONS = 500
GRADIENT_TOLERANCE = 1e-5
_LBFGS_MEMORY = 10
_ARMIJO = 1e-4


@dataclass(frozen=True, slots=True)
class LinearHead:
    """``logits = features @ weight.T + bias`` on raw (not standardised) features."""

    weight: FloatArray
    """(classes, features)"""
    bias: FloatArray
    """(classes,)"""

    def logits(self, features: npt.NDArray[np.floating[Any]]) -> FloatArray:
        """Logits (rows, classes) of ``features`` (rows, features)."""
        return np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias


@dataclass(frozen=True, slots=True)
class PenaltyScore:
    """How one penalty did out of fold."""

    l2: float
    accuracy: float
    balanced_accuracy: float
    log_loss: float
    """Class-weighted mean negative log-likelihood of the held-out images (temperature 1)."""


@dataclass(frozen=True, slots=True)
class TrainedHead:
    """The head fitted on every image with the chosen penalty, its temperature and its CV record."""

    head: LinearHead
    temperature: float
    l2: float
    folds: int
    scores: tuple[PenaltyScore, ...]
    oof_log_loss: float
    """Mean negative log-likelihood of the chosen penalty's out-of-fold predictions, temperature 1."""
    oof_log_loss_calibrated: float
    """The same at the fitted temperature (never higher: temperature 1 is among the candidates)."""

    @property
    def temperature_at_bound(self) -> bool:
        """The temperature sits at an end of its range: at the low end, every held-out image was
        predicted right, so the data cannot say how confident the head should be."""
        return self.temperature in (MIN_TEMPERATURE, MAX_TEMPERATURE)

    @property
    def chosen(self) -> PenaltyScore:
        """The cross-validation record of the chosen penalty."""
        return next(s for s in self.scores if s.l2 == self.l2)

    def calibrated_head(self) -> LinearHead:
        """The head with the temperature folded in: ``softmax(logits)`` is the calibrated output."""
        return LinearHead(self.head.weight / self.temperature, self.head.bias / self.temperature)


def class_weights(targets: IntArray, n_classes: int) -> FloatArray:
    """Per-class weights ``n / (K * n_c)``: each class carries the same total weight."""
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    if np.any(counts == 0):
        missing = np.flatnonzero(counts == 0).tolist()
        raise ConfigError(f"every class needs examples; class(es) {missing} have none")
    return len(targets) / (n_classes * counts)


def cv_fold_count(targets: IntArray) -> int:
    """``k = min(MAX_FOLDS, smallest class count)``: every class is in every fold."""
    return int(min(MAX_FOLDS, np.bincount(targets).min()))


def stratified_folds(targets: IntArray, k: int, seed: int = 0) -> list[IntArray]:
    """Held-out index sets of ``k`` folds; each class is shuffled and dealt round-robin.

    Every fold holds ``floor`` or ``ceil`` of ``n_c / k`` images of each class ``c``, so with
    ``k`` at most the smallest class count every class is in every fold's training and
    held-out rows.
    """
    if k < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {k}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(targets), dtype=np.int64)
    offset = 0
    for c in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == c))
        # Continuing the deal where the last class stopped keeps fold sizes balanced overall.
        fold_of[rows] = (np.arange(len(rows)) + offset) % k
        offset += len(rows)
    return [np.flatnonzero(fold_of == f) for f in range(k)]


def log_softmax(logits: FloatArray) -> FloatArray:
    """Row-wise log-softmax, stable for large logits."""
    shifted: FloatArray = logits - logits.max(axis=1, keepdims=True)
    result: FloatArray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return result


def mean_nll(logits: FloatArray, targets: IntArray, weights: FloatArray | None = None) -> float:
    """(Weighted) mean negative log-likelihood of ``targets`` under ``softmax(logits)``."""
    picked = -log_softmax(logits)[np.arange(len(targets)), targets]
    if weights is None:
        return float(picked.mean())
    return float((weights * picked).sum() / weights.sum())


def balanced_accuracy(predicted: IntArray, targets: IntArray, n_classes: int) -> float:
    """Mean over classes of the fraction of that class's rows predicted right."""
    recalls = [np.mean(predicted[targets == c] == c) for c in range(n_classes) if np.any(targets == c)]
    return float(np.mean(recalls))


def fit_linear_head(
    features: npt.NDArray[np.floating[Any]], targets: IntArray, n_classes: int, l2: float
) -> LinearHead:
    """Minimise the class-balanced, L2-regularised softmax loss on ``features``; see the module doc."""
    fit = _Standardised(np.asarray(features, dtype=np.float64), targets, n_classes)
    return fit.head(fit.solve(l2, fit.zeros()))


def train_head(
    features: npt.NDArray[np.floating[Any]],
    targets: IntArray,
    n_classes: int,
    *,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    seed: int = 0,
    on_fit: Callable[[], None] | None = None,
) -> TrainedHead:
    """Choose the penalty by stratified CV, fit the head on everything, fit the temperature.

    ``on_fit`` is called after each of the ``len(grid) * folds + 1`` fits (a progress bar).
    """
    x = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(targets):
        raise ConfigError(f"features {x.shape} and targets {targets.shape} do not describe the same rows")
    if not grid or any(value <= 0 for value in grid):
        raise ConfigError(f"the penalty grid must be positive values, got {list(grid)}")
    counts = np.bincount(targets, minlength=n_classes)
    if n_classes < 2 or counts.min() < 2:
        raise ConfigError(f"cross-validation needs two classes with two examples each, got counts {counts}")
    k = cv_fold_count(targets)
    weights = class_weights(targets, n_classes)[targets]
    # Strongest penalty first: each fit warm-starts the next, weaker one, near its optimum.
    penalties = sorted(grid, reverse=True)
    oof = {l2: np.zeros((len(x), n_classes)) for l2 in penalties}
    for held_out in stratified_folds(targets, k, seed):
        train = np.setdiff1d(np.arange(len(x)), held_out)
        fit = _Standardised(x[train], targets[train], n_classes)
        theta = fit.zeros()
        for l2 in penalties:
            theta = fit.solve(l2, theta)
            oof[l2][held_out] = fit.head(theta).logits(x[held_out])
            if on_fit is not None:
                on_fit()
    scores = []
    for l2 in sorted(grid):
        predicted = oof[l2].argmax(axis=1)
        scores.append(
            PenaltyScore(
                l2=float(l2),
                accuracy=float(np.mean(predicted == targets)),
                balanced_accuracy=balanced_accuracy(predicted, targets, n_classes),
                log_loss=mean_nll(oof[l2], targets, weights),
            )
        )
    best = max(scores, key=lambda s: (s.balanced_accuracy, -s.log_loss))
    full = _Standardised(x, targets, n_classes)
    head = full.head(full.solve(best.l2, full.zeros()))
    if on_fit is not None:
        on_fit()
    temperature = fit_temperature(oof[best.l2], targets)
    return TrainedHead(
        head=head,
        temperature=temperature,
        l2=best.l2,
        folds=k,
        scores=tuple(scores),
        oof_log_loss=mean_nll(oof[best.l2], targets),
        oof_log_loss_calibrated=mean_nll(oof[best.l2] / temperature, targets),
    )


def fit_temperature(
    logits: FloatArray,
    targets: IntArray | npt.NDArray[np.bool_],
    *,
    low: float = MIN_TEMPERATURE,
    high: float = MAX_TEMPERATURE,
) -> float:
    """The ``T`` in ``[low, high]`` minimising the mean NLL of ``softmax(logits / T)``.

    ``targets`` is either one class index per row, or a boolean mask ``(rows, classes)`` of the
    classes that are right for each row: the likelihood of a row is then the probability mass of
    its right classes (``engine-build calibrate`` fits the shipped ImageNet model this way, on
    the taxonomy label's score). With ``beta = 1 / T`` the slope of the mean NLL is
    ``mean(E_p[z] - E_p[z | right])``. For one right class per row the NLL is convex in ``beta``
    (a log-sum-exp of a linear function of ``beta`` minus a linear term); for a set of right
    classes it is a difference of two such terms and need not be. So the slope is evaluated on a
    grid of ``_TEMPERATURE_GRID`` values of ``beta``, evenly spaced in log space; every bracket
    where it turns from negative to non-negative is refined by bisection, in log space, to a
    relative precision of about 1e-6, and the local minimum (or bound) with the lowest NLL wins.
    In the convex case there is exactly one, so the grid changes nothing but the starting interval.
    """
    z = np.asarray(logits, dtype=np.float64)
    right = _right_classes(targets, z.shape)
    if not right.any(axis=1).all():
        raise ConfigError("every row needs at least one right class to fit a temperature")

    def nll(beta: float) -> float:
        logp = log_softmax(beta * z)
        return float(-np.mean(_masked_logsumexp(logp, right)))

    def slope(beta: float) -> float:
        logp = log_softmax(beta * z)
        p = np.exp(logp)
        # The distribution restricted to the right classes, renormalised, in log space.
        q = np.exp(logp - _masked_logsumexp(logp, right)[:, None]) * right
        return float(np.mean((p * z).sum(axis=1) - (q * z).sum(axis=1)))

    grid = np.linspace(np.log(1.0 / high), np.log(1.0 / low), _TEMPERATURE_GRID)
    slopes = [slope(float(np.exp(g))) for g in grid]
    candidates = []
    if slopes[0] >= 0:
        candidates.append(high)
    if slopes[-1] <= 0:
        candidates.append(low)
    for i in range(len(grid) - 1):
        if slopes[i] < 0 <= slopes[i + 1]:
            candidates.append(_bisect(slope, float(grid[i]), float(grid[i + 1])))
    # Convex: exactly one candidate. Otherwise the local minimum with the lowest NLL (first on ties).
    return min(candidates, key=lambda t: nll(1.0 / t))


_TEMPERATURE_GRID = 49
"""Grid points over ``log(1 / T)``, from ``1 / MAX_TEMPERATURE`` to ``1 / MIN_TEMPERATURE``."""


def _bisect(slope: Callable[[float], float], lo: float, hi: float) -> float:
    """``1 / exp(x)`` at the sign change of ``slope(exp(x))`` between ``lo`` and ``hi``."""
    for _ in range(60):
        mid = (lo + hi) / 2
        if slope(float(np.exp(mid))) < 0:
            lo = mid
        else:
            hi = mid
    return float(1.0 / np.exp((lo + hi) / 2))


def _right_classes(
    targets: IntArray | npt.NDArray[np.bool_], shape: tuple[int, ...]
) -> npt.NDArray[np.bool_]:
    """A boolean ``(rows, classes)`` mask from class indices or from a mask of that shape."""
    array = np.asarray(targets)
    if array.dtype == np.bool_:
        if array.shape != shape:
            raise ConfigError(f"a mask of right classes must be {shape} like the logits, not {array.shape}")
        return np.asarray(array, dtype=np.bool_)
    if array.shape != shape[:1]:
        raise ConfigError(f"one target per row expected ({shape[0]}), got {array.shape}")
    mask = np.zeros(shape, dtype=np.bool_)
    mask[np.arange(shape[0]), array.astype(np.int64)] = True
    return mask


def _masked_logsumexp(logp: FloatArray, mask: npt.NDArray[np.bool_]) -> FloatArray:
    """Row-wise ``log(sum(exp(logp)))`` over the ``mask``ed entries (each row has one)."""
    masked = np.where(mask, logp, -np.inf)
    top = masked.max(axis=1, keepdims=True)
    result: FloatArray = (top + np.log(np.exp(masked - top).sum(axis=1, keepdims=True)))[:, 0]
    return result


class _Standardised:
    """One fitting problem: standardised features, one-hot targets and class weights."""

    def __init__(self, features: FloatArray, targets: IntArray, n_classes: int) -> None:
        self.mean = features.mean(axis=0)
        scale = features.std(axis=0)
        # A constant feature (a channel the data never activates) carries nothing: scale 1.
        self.scale = np.where(scale > 1e-8, scale, 1.0)
        self.x = (features - self.mean) / self.scale
        self.onehot = np.eye(n_classes)[targets]
        self.weights = class_weights(targets, n_classes)[targets] / len(targets)
        self.n_features = features.shape[1]
        self.n_classes = n_classes

    def zeros(self) -> FloatArray:
        return np.zeros(self.n_features * self.n_classes + self.n_classes)

    def _unpack(self, theta: FloatArray) -> tuple[FloatArray, FloatArray]:
        split = self.n_features * self.n_classes
        return theta[:split].reshape(self.n_features, self.n_classes), theta[split:]

    def loss_and_gradient(self, theta: FloatArray, l2: float) -> tuple[float, FloatArray]:
        w, b = self._unpack(theta)
        logp = log_softmax(self.x @ w + b)
        data_term = -float((self.weights * (logp * self.onehot).sum(axis=1)).sum())
        loss = data_term + 0.5 * l2 * float((w * w).sum())
        residual = (np.exp(logp) - self.onehot) * self.weights[:, None]
        grad_w = self.x.T @ residual + l2 * w
        return loss, np.concatenate([grad_w.ravel(), residual.sum(axis=0)])

    def solve(self, l2: float, start: FloatArray) -> FloatArray:
        return _lbfgs(lambda theta: self.loss_and_gradient(theta, l2), start)

    def head(self, theta: FloatArray) -> LinearHead:
        """Fold the standardisation in: ``((x - m) / s) @ W + b == x @ (W / s) + (b - (m / s) @ W)``."""
        w, b = self._unpack(theta)
        raw = w / self.scale[:, None]
        return LinearHead(weight=np.ascontiguousarray(raw.T), bias=b - self.mean @ raw)


def _lbfgs(
    objective: Callable[[FloatArray], tuple[float, FloatArray]],
    start: FloatArray,
    *,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = GRADIENT_TOLERANCE,
) -> FloatArray:
    """Minimise a smooth convex ``objective`` (value, gradient) with L-BFGS and Armijo backtracking.

    Stops when the largest gradient component is below ``tolerance``, after ``max_iterations``,
    or when a line search cannot decrease the value any more (the minimum to float precision).
    """
    x = start.copy()
    value, grad = objective(x)
    history: deque[tuple[FloatArray, FloatArray, float]] = deque(maxlen=_LBFGS_MEMORY)
    for _ in range(max_iterations):
        if float(np.max(np.abs(grad))) <= tolerance:
            break
        direction = -_two_loop(grad, history)
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction (curvature pairs gone stale): restart
            history.clear()
            direction, slope = -grad, -float(grad @ grad)
        step = 1.0 if history else min(1.0, 1.0 / float(np.linalg.norm(grad)))
        while True:
            candidate = x + step * direction
            new_value, new_grad = objective(candidate)
            if new_value <= value + _ARMIJO * step * slope:
                break
            step *= 0.5
            if step < 1e-12:
                return x
        s, y = candidate - x, new_grad - grad
        sy = float(s @ y)
        if sy > 1e-12 * float(y @ y):
            history.append((s, y, 1.0 / sy))
        x, value, grad = candidate, new_value, new_grad
    return x


def _two_loop(grad: FloatArray, history: deque[tuple[FloatArray, FloatArray, float]]) -> FloatArray:
    """L-BFGS's two-loop recursion: the inverse-Hessian estimate applied to ``grad``."""
    q = grad.copy()
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * float(s @ q)
        alphas.append(alpha)
        q -= alpha * y
    if history:
        s, y, _ = history[-1]
        q *= float(s @ y) / float(y @ y)
    for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
        beta = rho * float(y @ q)
        q += (alpha - beta) * s
    return q
