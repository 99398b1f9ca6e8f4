"""Long-tailed training subsets: ``cacr prepare ... --imbalance PROFILE``.

A profile says which fraction ``f_c`` of its training images each class ``c`` (of ``C``, in label
order) keeps; the class then keeps ``floor(f_c · n_c)`` of its ``n_c`` training images (the usual
CIFAR-LT rounding). Only the TRAINING split is subsampled; validation stays balanced so that
per-class accuracy is measured on equal footing.

Profiles (``R`` = imbalance ratio = largest / smallest fraction, ``R >= 1``):

* ``exp:R`` (the usual CIFAR-LT):   ``f_c = R^(−c / (C−1))``; class 0 keeps everything, class C−1
  keeps 1/R (``exp:10``, ``exp:100``).
* ``linear:R``:                    ``f_c = 1/R + (1 − 1/R) · c / (C−1)``; class 0 keeps 1/R, class
  C−1 keeps everything, linear in between. With ``R = C`` this is exactly the CACR authors' CIFAR-10
  profile ``f_c = (c + 1) / C`` (ratio C); plain ``linear`` means ``linear:C``.
* ``none`` (or an empty string): balanced, nothing removed.

Sampling is seeded: class ``c``'s training images are permuted with a generator derived from
``(seed, c)`` and the first ``floor(f_c · n_c)`` are kept, so for one seed a steeper profile keeps a
SUBSET of what a milder one keeps (exp:100 ⊂ exp:10 class by class), and the result does not depend
on the order of the other classes. The training order written to shards is unchanged (the kept
images stay in the split's shuffled order).

A profile that leaves a class with no training image is refused (one line naming the class) unless
``allow_empty_classes`` is set: an evaluation would otherwise report a class that was never trained
on without saying so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.data.format import DataError

KINDS = ("exp", "linear")
SEED_SALT = 0x1A7E  # keeps the subsampling stream apart from the train/val split stream


@dataclass(frozen=True)
class Profile:
    """A parsed ``--imbalance`` value; ``ratio`` None for ``linear`` means "the number of classes"."""

    kind: str
    ratio: float | None

    @property
    def text(self) -> str:
        if self.ratio is None:
            return self.kind
        return f"{self.kind}:{self.ratio:g}"

    def resolved_ratio(self, num_classes: int) -> float:
        return float(num_classes) if self.ratio is None else float(self.ratio)

    def fractions(self, num_classes: int) -> np.ndarray:
        """``f_c`` for c = 0 … C−1 (float64, in (0, 1], class 0 first)."""
        C = int(num_classes)
        if C < 1:
            raise DataError("--imbalance needs at least one class")
        if C == 1:
            return np.ones(1)
        r = self.resolved_ratio(C)
        t = np.arange(C, dtype=np.float64) / (C - 1)        # 0 … 1
        if self.kind == "exp":
            return r ** (-t)
        return 1.0 / r + (1.0 - 1.0 / r) * t                 # linear


def parse_profile(text: str | None) -> Profile | None:
    """``"exp:100"`` / ``"linear:10"`` / ``"linear"`` -> :class:`Profile`; ``None``/``""``/``"none"``
    -> None (balanced). Raises :class:`DataError` with the accepted forms on anything else."""
    if text is None:
        return None
    s = str(text).strip().lower()
    if s in ("", "none", "balanced"):
        return None
    kind, sep, raw = s.partition(":")
    usage = "use exp:R or linear:R with a ratio R >= 1 (e.g. exp:100), linear (ratio = classes) or none"
    if kind not in KINDS:
        raise DataError(f"--imbalance {text!r}: unknown profile '{kind}'; {usage}")
    if not sep:
        if kind == "linear":
            return Profile("linear", None)
        raise DataError(f"--imbalance {text!r}: exp needs a ratio; {usage}")
    try:
        ratio = float(raw)
    except ValueError:
        raise DataError(f"--imbalance {text!r}: ratio '{raw}' is not a number; {usage}") from None
    if not math.isfinite(ratio) or ratio < 1:
        raise DataError(f"--imbalance {text!r}: ratio must be a finite number >= 1; {usage}")
    return Profile(kind, ratio)


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Images per class 0 … C−1 (labels < 0, unlabelled, are not counted)."""
    lab = np.asarray(labels, dtype=np.int64)
    return np.bincount(lab[lab >= 0], minlength=num_classes)[:num_classes].astype(int).tolist()


def subsample(indices: np.ndarray, labels: np.ndarray, profile: Profile, *, seed: int,
              class_names: Sequence[str], allow_empty_classes: bool = False) -> np.ndarray:
    """The kept subset of ``indices`` (source indices of the training split, in their order).

    ``labels`` are the labels of the whole source (indexed by ``indices``). Raises DataError when a
    class would keep zero images and ``allow_empty_classes`` is False."""
    C = len(class_names)
    if C == 0:
        raise DataError("--imbalance needs a labelled source (class sub-folders, digits, CIFAR)")
    idx = np.asarray(indices, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)[idx]
    frac = profile.fractions(C)
    members = [np.flatnonzero(lab == c) for c in range(C)]   # positions of class c in `idx`
    # floor with a tolerance, so that 0.1 * 10 keeps 1 despite float rounding
    ks = [int(math.floor(frac[c] * len(pos) + 1e-9)) for c, pos in enumerate(members)]
    empty = [c for c in range(C) if ks[c] == 0 and len(members[c]) > 0]
    if empty and not allow_empty_classes:
        c = empty[0]
        more = f" (and {len(empty) - 1} more class(es): {empty[1:]})" if len(empty) > 1 else ""
        raise DataError(
            f"--imbalance {profile.text} would leave class {c} ('{class_names[c]}') with 0 of its "
            f"{len(members[c])} training images (it keeps {100 * frac[c]:.3g}%){more}: use a milder "
            "ratio, or --allow-empty-classes to train without it")
    keep = np.zeros(len(idx), dtype=bool)
    for c, pos in enumerate(members):
        # permute in source-index order so the choice does not depend on the split's shuffle
        order = np.argsort(idx[pos], kind="stable")
        rng = np.random.default_rng([int(seed), SEED_SALT, c])
        keep[pos[order][rng.permutation(len(pos))[:ks[c]]]] = True
    return idx[keep]


def describe(profile: Profile | None, num_classes: int, before: list[int], after: list[int],
             allow_empty_classes: bool = False) -> dict[str, Any] | None:
    """The ``imbalance`` record of index.json (None when balanced)."""
    if profile is None:
        return None
    return {"profile": profile.text, "kind": profile.kind,
            "ratio": profile.resolved_ratio(num_classes),
            "fractions": [round(float(f), 6) for f in profile.fractions(num_classes)],
            "train_counts_before": before, "train_counts": after,
            "allow_empty_classes": bool(allow_empty_classes), "splits": ["train"]}


__all__ = ["Profile", "parse_profile", "subsample", "class_counts", "describe", "KINDS"]
