"""Galaxy: the large-scale shape of the SAE's feature point cloud.

The study reports that the point cloud of SAE feature vectors is not isotropic: the
eigenvalues of its covariance fall off as a power law, steepest in the middle layers. The
point cloud here is the SAE's unit decoder rows (one point per feature, alive or not); the
power law is fitted by ``gsam_monitor.analysis.spectrum.powerlaw_fit`` over the same
rank range as the activation spectrum the monitor reports, so the two alphas compare.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gsam_monitor.analysis.spectrum import powerlaw_fit
from gsam_monitor.metrics.scores import POWERLAW_RANGE

__all__ = ["point_cloud_powerlaw", "point_cloud_spectrum"]


def point_cloud_spectrum(points: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending, fp64) of the MLE covariance of a point cloud (m, d)."""
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"points: expected an (m >= 2, d) array, got shape {x.shape}")
    centred = x - x.mean(axis=0)
    return np.clip(np.linalg.eigvalsh(centred.T @ centred / x.shape[0])[::-1], 0.0, None)


def point_cloud_powerlaw(points: np.ndarray, rank_range: tuple[int, int] = POWERLAW_RANGE) -> dict[str, Any]:
    """``powerlaw_fit`` of the point cloud's covariance spectrum (alpha, 95% CI, r2, n_points)."""
    return powerlaw_fit(point_cloud_spectrum(points), rank_range)
