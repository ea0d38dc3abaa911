"""Clustering metrics: NMI and pair-counting F1 of k-means clusters (k = number of classes).

Embeddings are L2-normalised, then clustered by k-means with k = number of distinct
labels: faiss's k-means when faiss is installed (CPU), else a chunked Lloyd's k-means in
torch (GPU machines without faiss). Both are seeded; the numbers depend on k-means'
initialisation, which is why they are reported separately from the exact retrieval
metrics.

NMI = I(classes; clusters) / mean(H(classes), H(clusters)) (the arithmetic mean, as
scikit-learn's default). F1 counts pairs: precision = same-cluster pairs that share a
class / same-cluster pairs; recall = same-class pairs that share a cluster / same-class
pairs (as in the Proxy Anchor evaluation).
"""

from __future__ import annotations

import numpy as np
import torch

from vpt_dml.errors import UserError

SKIPPED_LABEL = -1


def _contingency(labels: torch.Tensor, clusters: torch.Tensor):
    """Non-zero cell counts n_ij, class sizes a_i and cluster sizes b_j (float64)."""
    _, lab = torch.unique(labels, return_inverse=True)
    _, clu = torch.unique(clusters, return_inverse=True)
    key = lab * (int(clu.max()) + 1) + clu
    _, cells = torch.unique(key, return_counts=True)
    a = torch.bincount(lab).double()
    b = torch.bincount(clu).double()
    return cells.double(), a, b


def nmi(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    cells, a, b = _contingency(torch.as_tensor(labels), torch.as_tensor(clusters))
    n = a.sum()
    h_a = -(a / n * torch.log(a / n)).sum()
    h_b = -(b / n * torch.log(b / n)).sum()
    if h_a == 0 and h_b == 0:  # one class, one cluster: identical partitions
        return 1.0
    # I = sum n_ij/N log(N n_ij / (a_i b_j)); expand to avoid indexing a_i, b_j per cell
    mi = (
        (cells / n * torch.log(cells / n)).sum()
        - (a / n * torch.log(a / n)).sum()
        - (b / n * torch.log(b / n)).sum()
    )
    return float((mi / ((h_a + h_b) / 2)).clamp(0, 1))


def pair_f1(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    cells, a, b = _contingency(torch.as_tensor(labels), torch.as_tensor(clusters))

    def pairs(x: torch.Tensor) -> torch.Tensor:
        return (x * (x - 1) / 2).sum()

    tp, same_cluster, same_class = pairs(cells), pairs(b), pairs(a)
    if tp == 0:
        return 0.0
    precision, recall = tp / same_cluster, tp / same_class
    return float(2 * precision * recall / (precision + recall))


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """Cluster id per row of (normalised) x."""
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None and x.device.type == "cpu":
        data = np.ascontiguousarray(x.float().numpy())
        km = faiss.Kmeans(data.shape[1], k, niter=iters, seed=seed, verbose=False)
        km.train(data)
        return torch.from_numpy(km.index.search(data, 1)[1][:, 0])
    return _torch_kmeans(x.float(), k, seed, iters)


def _torch_kmeans(
    x: torch.Tensor, k: int, seed: int, iters: int, chunk: int = 8192
) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # k-means++ seeding: each new centre drawn with probability ~ squared distance
    picks = [int(torch.randint(len(x), (1,), generator=gen))]
    dist = ((x - x[picks[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        pick = int(torch.multinomial(dist.double().cpu() + 1e-30, 1, generator=gen))
        picks.append(pick)
        dist = torch.minimum(dist, ((x - x[pick]) ** 2).sum(1))
    centres = x[picks].clone()
    sq = (x * x).sum(1)
    for _ in range(iters + 1):
        assign = torch.cat(
            [  # nearest centre by squared L2, chunked to bound memory
                (
                    sq[s : s + chunk, None] - 2 * x[s : s + chunk] @ centres.T + (centres**2).sum(1)
                ).argmin(1)
                for s in range(0, len(x), chunk)
            ]
        )
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0  # keep an empty cluster's old centre
        centres = torch.where(empty[:, None], centres, sums / counts.clamp(min=1)[:, None])
    return assign.cpu()


def clustering_metrics(
    embeddings: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    seed: int = 0,
    iters: int = 20,
) -> dict[str, float]:
    """{"nmi", "f1"} of k-means (k = number of classes) on the L2-normalised embeddings."""
    x = torch.as_tensor(embeddings)
    y = torch.as_tensor(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise UserError(
            f"clustering needs (N, D) embeddings and N labels, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    keep = y != SKIPPED_LABEL
    x, y = torch.nn.functional.normalize(x[keep].float(), dim=1), y[keep].cpu()
    k = len(torch.unique(y))
    if k < 2 or len(x) <= k:
        raise UserError(
            f"clustering needs at least 2 classes and more items than classes, got {k} classes "
            f"and {len(x)} items"
        )
    clusters = kmeans(x, k, seed, iters)
    return {"nmi": nmi(y, clusters), "f1": pair_f1(y, clusters)}
