"""Estimators of sampled evaluation: pass@k from n samples, and majority voting.

pass@k is the chance that at least one of k completions drawn without replacement from
a prompt's n samples is correct; with c correct it is ``1 - C(n-c, k) / C(n, k)``, the
unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on
Code"), computed as a product so that large n does not overflow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct among ``n`` samples (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod (1 - k / i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority(answers: Sequence[str]) -> int | None:
    """Index of the first answer of the most frequent non-empty answer (ties: the one seen
    first), or None when every answer is empty."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a and counts[a] == top)


def maj_at_k(answers: Sequence[str], correct: Sequence[bool], k: int) -> float:
    """maj@k of one prompt: the share of its disjoint runs of ``k`` samples (the first
    ``len // k * k`` samples, in order) whose majority answer is correct. Each run is one
    unbiased draw of maj@k; averaging the runs lowers the variance."""
    if len(answers) != len(correct):
        raise ValueError("answers and correct differ in length")
    runs = len(answers) // k
    if runs == 0:
        raise ValueError(f"maj@{k} needs at least {k} samples, got {len(answers)}")
    if k == 1:  # each run's majority is its one non-empty answer
        return sum(bool(a) and bool(c) for a, c in zip(answers, correct, strict=True)) / runs
    right = 0
    for r in range(runs):
        chunk = slice(r * k, (r + 1) * k)
        pick = majority(answers[chunk])
        right += pick is not None and bool(correct[chunk][pick])
    return right / runs
