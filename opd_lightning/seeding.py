"""Seeds of a run's random draws, derived by one documented, version-independent function.

Why: three properties depend on how draws are seeded. A resumed run must draw what the uninterrupted run would;
data-parallel ranks must agree on every choice that decides which collectives they enter (a step on-policy on one rank
and off-policy on another deadlocks a sharded generation); and a row's sampling noise should not depend on the rank or
micro-batch it lands in, so that a two-rank step equals the one-process step.

Choice: `numpy.random.SeedSequence`, whose mixing of integer entropy is specified and stable across NumPy versions and
platforms (Python's `hash()` of a tuple is an implementation detail of CPython). Every draw is keyed by the run's seed,
a purpose, and integers that identify it: the optimizer step for the on/off-policy choice (the same on every rank), and
(step, dataset row) for a row's sampling noise (different per row, hence per rank).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BRANCH", "SAMPLE_EVAL", "SAMPLE_TEACHER", "SAMPLE_TRAIN", "derive_seed", "uniform"]

# Purposes: each keeps its draws apart from the others'.
BRANCH = 1  # the on/off-policy choice of a training step
SAMPLE_TRAIN = 2  # the student's sampling noise for a training row
SAMPLE_EVAL = 3  # the student's sampling noise for a validation or test row
SAMPLE_TEACHER = 4  # the teacher's sampling noise when it writes a row's completion (sequence-level KD)


def derive_seed(seed: int, *key: int) -> int:
    """A 63-bit seed from the run's `seed` and non-negative integer `key` parts (e.g. purpose, step, row).

    The same arguments give the same seed on every machine, rank and NumPy version; different keys give seeds as
    independent as SeedSequence's hashing makes them.
    """
    if seed < 0 or any(k < 0 for k in key):
        raise ValueError(f"seeds and keys must be non-negative integers, got seed={seed}, key={key}")
    state = np.random.SeedSequence([seed, *key]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63


def uniform(seed: int, *key: int) -> float:
    """One number in [0, 1) drawn from `derive_seed(seed, *key)`."""
    return float(np.random.default_rng(np.random.SeedSequence([seed, *key])).random())
