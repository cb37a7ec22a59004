"""Analytic bias correction: the per-channel output shift of rounded convolution weights."""

from __future__ import annotations

import numpy as np
import pytest

from engine_build.bias_correction import bias_shift
from stream_worker.errors import EngineError


def _conv_at_one_position(weights: np.ndarray, group: int, patch: np.ndarray) -> np.ndarray:
    """A grouped convolution whose kernel covers the whole input ``patch`` (one output position)."""
    out_channels, in_per_group = weights.shape[:2]
    per_group = out_channels // group
    return np.array(
        [
            (weights[o] * patch[(o // per_group) * in_per_group : (o // per_group + 1) * in_per_group]).sum()
            for o in range(out_channels)
        ]
    )


@pytest.mark.parametrize(("in_channels", "out_channels", "group"), [(4, 6, 1), (4, 6, 2), (8, 8, 8)])
def test_shift_is_the_output_change_on_an_input_at_its_channel_means(
    in_channels: int, out_channels: int, group: int
) -> None:
    rng = np.random.default_rng(group)
    weights = rng.normal(size=(out_channels, in_channels // group, 3, 3))
    error = rng.normal(scale=0.01, size=weights.shape)
    means = rng.normal(size=in_channels)
    patch = np.broadcast_to(means[:, None, None], (in_channels, 3, 3))
    change = _conv_at_one_position(weights + error, group, patch) - _conv_at_one_position(
        weights, group, patch
    )
    np.testing.assert_allclose(bias_shift(error, group, means), change, rtol=1e-9, atol=1e-12)


def test_a_weight_that_does_not_fit_the_input_is_an_engine_error() -> None:
    with pytest.raises(EngineError, match="does not fit 5 input channels"):
        bias_shift(np.zeros((6, 2, 3, 3)), 2, np.zeros(5))
