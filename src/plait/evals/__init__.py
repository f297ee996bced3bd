"""Evaluation beyond held-out accuracy: named eval sets with pass@k and maj@k
(:mod:`plait.evals.suites`), and bias probes asked under three conditions
(:mod:`plait.evals.bias`)."""
