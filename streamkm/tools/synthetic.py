"""Synthetic feature-vector streams for the demo and the producer: drifting clusters."""

from __future__ import annotations

import numpy as np


class DriftingBlobs:
    """Gaussian clusters of unequal size and spread whose centres drift slowly.

    Parameters
    ----------
    dim : int
        Number of features.
    n_clusters : int, default 8
        Number of true clusters.
    outlier_fraction : float, default 0.02
        Share of vectors drawn far from every cluster (the anomalies).
    drift_per_sample : float, default 2e-5
        How far (in units of cluster spread) each centre moves per generated vector.
    seed : int, default 0
        Random seed.
    """

    def __init__(
        self,
        dim: int,
        n_clusters: int = 8,
        outlier_fraction: float = 0.02,
        drift_per_sample: float = 2e-5,
        seed: int = 0,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.centers = self.rng.normal(0.0, 10.0, size=(n_clusters, dim))
        self.spread = self.rng.uniform(0.5, 1.5, size=n_clusters)
        weights = self.rng.uniform(0.2, 1.0, size=n_clusters)
        self.weights = weights / weights.sum()
        self.velocity = self.rng.normal(0.0, 1.0, size=(n_clusters, dim))
        self.velocity /= np.linalg.norm(self.velocity, axis=1, keepdims=True)
        self.outlier_fraction = outlier_fraction
        self.drift = drift_per_sample

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` vectors.

        Returns
        -------
        X : ndarray of shape (n, dim), float32
        is_outlier : ndarray of shape (n,), bool
        """
        labels = self.rng.choice(len(self.centers), size=n, p=self.weights)
        noise = self.rng.normal(size=(n, self.dim)) * self.spread[labels, None]
        X = self.centers[labels] + noise
        is_outlier = self.rng.random(n) < self.outlier_fraction
        n_out = int(is_outlier.sum())
        if n_out:
            direction = self.rng.normal(size=(n_out, self.dim))
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            X[is_outlier] = direction * self.rng.uniform(40.0, 60.0, size=(n_out, 1))
        self.centers += self.velocity * self.drift * n
        return X.astype(np.float32), is_outlier
