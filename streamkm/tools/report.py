"""A picture of a run: inertia over time, cluster sizes and a 2-D view of the centroids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from streamkm.checkpoint import read as read_checkpoint
from streamkm.errors import StreamkmError

REPORT_EXTRA_HINT = "pip install 'streamkm[report]'"


def require_matplotlib() -> None:
    """Raise StreamkmError, naming the ``report`` extra, unless matplotlib can be imported.

    ``streamkm demo --report`` calls it before the run starts, so a missing extra is not
    found only after the whole run.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError as exc:
        raise StreamkmError(
            f"drawing a report needs matplotlib, which is not installed ({exc}): "
            f"{REPORT_EXTRA_HINT}"
        ) from None


def check_output_path(out: str | os.PathLike[str]) -> Path:
    """The report's path, if a file can be written there; StreamkmError saying why not."""
    path = Path(out)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise StreamkmError(f"cannot write the report to {path}: it is a directory")
    if not parent.is_dir():
        raise StreamkmError(f"cannot write the report to {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StreamkmError(
            f"cannot write the report to {path}: directory {parent} is not writable"
        )
    return path


def draw_report(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Draw the newest checkpoint of ``checkpoint`` (a file or directory) to a PNG.

    The checkpoint carries the per-batch inertia history of the run, the model's centroids
    and their weights. Needs matplotlib (``pip install 'streamkm[report]'``).

    Raises
    ------
    StreamkmError
        Without matplotlib, when ``out`` cannot be written, or when no checkpoint is read.
    """
    require_matplotlib()
    import matplotlib.pyplot as plt

    path = check_output_path(out)
    ckpt = read_checkpoint(checkpoint)
    model = ckpt.model
    history = np.asarray(ckpt.meta.get("extra", {}).get("history", []), dtype=np.float64)
    centers = np.asarray(model.cluster_centers_, dtype=np.float64)
    counts = np.asarray(model.counts_, dtype=np.float64)

    fig, (ax_curve, ax_sizes, ax_map) = plt.subplots(
        1, 3, figsize=(16, 4.8), width_ratios=[2.2, 1, 1.3]
    )
    if len(history):
        seen, last, ewma = history[:, 1], history[:, 2], history[:, 3]
        ax_curve.plot(seen, last, lw=0.8, alpha=0.45, label="last batch")
        ax_curve.plot(seen, ewma, lw=2.0, label="moving average")
        ax_curve.set_yscale("log")
        ax_curve.legend()
    else:
        ax_curve.text(
            0.5, 0.5, "no history in this checkpoint", ha="center", transform=ax_curve.transAxes
        )
    ax_curve.set_title("inertia (mean squared distance per vector)")
    ax_curve.set_xlabel("vectors seen")

    order = np.arange(len(counts))
    ax_sizes.bar(order, counts, color="tab:blue")
    ax_sizes.set_title("cluster weights")
    ax_sizes.set_xlabel("cluster")
    ax_sizes.set_xticks(order if len(order) <= 20 else order[:: max(1, len(order) // 10)])

    ax_map.set_title("centroids, 2-D projection (PCA)")
    xy = _project_2d(centers)
    sizes = 40 + 400 * counts / max(float(counts.max()), 1e-12)
    ax_map.scatter(xy[:, 0], xy[:, 1], s=sizes, c=order, cmap="tab10", alpha=0.8, edgecolors="k")
    for j, (x, y) in enumerate(xy):
        ax_map.annotate(str(j), (x, y), ha="center", va="center", fontsize=8)
    ax_map.set_xlabel("component 1")
    ax_map.set_ylabel("component 2")

    fig.suptitle(
        f"streamkm model version {model.n_steps_}: {model.n_clusters} clusters, dim {model.n_features_in_}, "
        f"{float(model.n_samples_seen_):,.0f} vectors"
    )
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise StreamkmError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path


def _project_2d(points: np.ndarray) -> np.ndarray:
    """Principal-component projection to two dimensions (padded for d < 2)."""
    centred = points - points.mean(axis=0)
    if points.shape[1] < 2 or len(points) < 2:
        return np.pad(centred[:, :2], ((0, 0), (0, max(0, 2 - centred.shape[1]))))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[:2].T
    return np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
