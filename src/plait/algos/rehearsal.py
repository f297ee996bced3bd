"""Selective rehearsal's selection (Peng et al. 2023, arXiv 2309.10202): cluster the
candidates' prompt embeddings with k-means and keep, in every cluster, the responses
that score highest, so the rehearsed set covers every kind of prompt the policy already
answers well instead of the kinds it answers most often.

- :func:`kmeans`: Lloyd's iterations from a k-means++ start (Arthur and Vassilvitskii
  2007), every draw from a seeded generator, so a selection is the same on every rank
  and after a resume.
- :func:`select_per_cluster`: ``size`` indices, the quota of each cluster
  (``size / k``, the remainder to the largest clusters) filled by its best scores; what a
  small cluster cannot fill goes to the best remaining candidates of any cluster.
"""

from __future__ import annotations

import torch

__all__ = ["kmeans", "select_per_cluster"]


def kmeans(points: torch.Tensor, k: int, *, seed: int, iterations: int = 50
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``points`` ``[N, D]`` into ``min(k, N)`` clusters.

    Returns ``(labels [N] long, centres [k', D])`` in float64. The first centre is a
    uniformly drawn point, each next one a point drawn with probability proportional to
    its squared distance to the nearest centre so far; Lloyd's iterations stop when no
    label changes. An emptied cluster keeps its centre."""
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"expected points [N, D] with N >= 1, got {tuple(points.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = points.double().cpu()
    n = x.shape[0]
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    nearest = ((x - x[first]) ** 2).sum(-1)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0:  # every point sits on a centre: any point is as good
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(nearest / total, 1, generator=generator))
        centres.append(x[pick])
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(-1))
    centre = torch.stack(centres)
    labels = torch.cdist(x, centre).argmin(-1)
    for _ in range(iterations):
        for c in range(k):
            members = labels == c
            if members.any():
                centre[c] = x[members].mean(0)
        new = torch.cdist(x, centre).argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centre


def select_per_cluster(labels: torch.Tensor, scores: torch.Tensor, size: int
                       ) -> list[int]:
    """Indices of ``size`` candidates (all of them when fewer): each cluster's best
    ``scores`` up to its quota, then the best of the rest; a tie goes to the lower
    index. Sorted by cluster, then by score (best first)."""
    if labels.shape != scores.shape or labels.dim() != 1:
        raise ValueError(f"labels and scores must be [N] alike, got {tuple(labels.shape)} "
                         f"and {tuple(scores.shape)}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    n = labels.numel()
    if size >= n:
        size = n
    clusters = sorted(set(labels.tolist()))
    members = {c: sorted((i for i in range(n) if int(labels[i]) == c),
                         key=lambda i: (-float(scores[i]), i)) for c in clusters}
    # quotas: an equal share, the remainder to the largest clusters (then lower labels)
    base, extra = divmod(size, len(clusters)) if clusters else (0, 0)
    by_size = sorted(clusters, key=lambda c: (-len(members[c]), c))
    quota = {c: base + (1 if rank < extra else 0) for rank, c in enumerate(by_size)}
    picked = {c: members[c][:quota[c]] for c in clusters}
    short = size - sum(len(p) for p in picked.values())
    if short:
        rest = sorted((i for c in clusters for i in members[c][len(picked[c]):]),
                      key=lambda i: (-float(scores[i]), i))[:short]
        for i in rest:
            picked[int(labels[i])].append(i)
    return [i for c in clusters
            for i in sorted(picked[c], key=lambda i: (-float(scores[i]), i))]
