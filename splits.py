"""The split protocol: five stratified subsets and their folds for AD (Sec. 4.3.4, App. C.1); brain age 80/10/10.

Both deal a shuffled cohort into parts within groups of (sex, diagnosis, age bin), so every part keeps
the joint distribution; the same seed gives the same split on every machine and in every run.
"""
import numpy as np

from safeio import UserError


def _bins(age, n_bins):
    """Equal-width age bins over the known ages; an unknown age (NaN) is a bin of its own (-1), so the
    split never depends on imputation."""
    age = np.asarray(age, np.float64)
    known = np.isfinite(age)
    if not known.any():
        return np.full(len(age), -1)
    edges = np.linspace(age[known].min(), age[known].max(), n_bins + 1)[1:-1]
    return np.where(known, np.digitize(np.where(known, age, 0.0), edges), -1)


def _stratified_order(keys, seed):
    """Shuffle with the seed, then group by the stratification keys (random order within a group)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(keys[0]))
    order = np.lexsort(tuple(np.asarray(k)[perm] for k in reversed(keys)))  # stable: keeps perm inside groups
    return perm[order]


def ad_split(sex, labels, age, seed, n_subsets=5, n_age_bins=20):
    """-> (N,) int64 subset id 0..n_subsets-1 per subject (Sec. 4.3.4).

    Shuffled with `seed`, then dealt round-robin into the subsets within each (sex, diagnosis,
    age bin) group, an unknown sex or age forming groups of their own; the dealing position carries
    over from one group to the next, so the subsets differ in size by at most one and keep the
    joint distribution.
    """
    n = len(labels)
    if n < n_subsets:
        raise UserError(f"{n} subjects cannot be split into {n_subsets} subsets")
    order = _stratified_order([sex, labels, _bins(age, n_age_bins)], seed)
    subsets = np.empty(n, np.int64)
    subsets[order] = np.arange(n) % n_subsets
    return subsets


def ad_fold(subsets, fold, test_subset=4):
    """-> (train_idx, val_idx, test_idx): test = subset 4, validation = subset `fold` (0..3), train = rest."""
    subsets = np.asarray(subsets)
    n_sub = int(subsets.max()) + 1
    if not (0 <= fold < n_sub) or fold == test_subset:
        raise UserError(f"fold must be in 0..{n_sub - 2} (subset {test_subset} is the test set), got {fold}")
    idx = np.arange(len(subsets))
    return (idx[(subsets != fold) & (subsets != test_subset)], idx[subsets == fold], idx[subsets == test_subset])


BRAIN_AGE_FRACTIONS = (0.8, 0.1, 0.1)  # Sec. 4.2.3


def brain_age_split(age, sex, seed, fractions=None, n_age_bins=20):
    """-> (train_idx, val_idx, test_idx), 80/10/10 (or `fractions`) stratified by sex and age bins (Sec. 4.2.3).

    Same dealing as ad_split, but by quotas: the next subject goes to the part furthest below
    its share so far, so every (sex, age bin) group is cut in the given fractions.
    """
    fractions = BRAIN_AGE_FRACTIONS if fractions is None else fractions
    fr = np.asarray(fractions, np.float64)
    if len(age) < len(fr) or np.any(fr < 0) or abs(fr.sum() - 1) > 1e-6:
        raise UserError(f"cannot split {len(age)} subjects into fractions {tuple(fractions)}")
    order = _stratified_order([sex, _bins(age, n_age_bins)], seed)
    counts = np.zeros(len(fr))
    part = np.empty(len(order), np.int64)
    for k, i in enumerate(order):
        j = int(np.argmax(fr * (k + 1) - counts))
        part[i] = j
        counts[j] += 1
    return tuple(np.flatnonzero(part == j) for j in range(len(fr)))
