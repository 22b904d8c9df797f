"""The Correspondences type: sparse point pairs (fixed -> moving) with a confidence."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AUTOMATIC = 0
USER = 1


@dataclass
class Correspondences:
    """N fixed points (LPS mm), their displacements to the moving image (mm), confidence in [0, 1].

    The moving point of pair i is `fixed_lps[i] + displacement_mm[i]`. `source` is AUTOMATIC (0)
    for matched keypoints and USER (1) for clicked pairs.
    """

    fixed_lps: np.ndarray
    displacement_mm: np.ndarray
    confidence: np.ndarray
    source: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.fixed_lps = np.asarray(self.fixed_lps, dtype=np.float64).reshape(-1, 3)
        self.displacement_mm = np.asarray(self.displacement_mm, dtype=np.float64).reshape(-1, 3)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(-1)
        if self.source is None:
            self.source = np.full(len(self.fixed_lps), AUTOMATIC, dtype=np.int8)
        self.source = np.asarray(self.source, dtype=np.int8).reshape(-1)
        n = len(self.fixed_lps)
        if not (len(self.displacement_mm) == len(self.confidence) == len(self.source) == n):
            raise ValueError("correspondence arrays differ in length")

    def __len__(self) -> int:
        return len(self.fixed_lps)

    @property
    def moving_lps(self) -> np.ndarray:
        """The moving-image points, LPS mm."""
        return self.fixed_lps + self.displacement_mm

    def subset(self, keep: np.ndarray) -> Correspondences:
        """The correspondences selected by a boolean mask or index array."""
        return Correspondences(
            self.fixed_lps[keep], self.displacement_mm[keep], self.confidence[keep], self.source[keep]
        )

    def concat(self, other: Correspondences) -> Correspondences:
        """These correspondences followed by `other`."""
        return Correspondences(
            np.concatenate([self.fixed_lps, other.fixed_lps]),
            np.concatenate([self.displacement_mm, other.displacement_mm]),
            np.concatenate([self.confidence, other.confidence]),
            np.concatenate([self.source, other.source]),
        )
