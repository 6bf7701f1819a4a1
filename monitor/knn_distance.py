"""The gated score's nearest-neighbour component (issue 20): KNN's score (Sun et al. 2022, "Out-
of-distribution detection with deep nearest neighbors"; pytorch-ood's ``KNN``) on the head
layer's channel means.

An input's features are the channel means of the head layer (the feature map the classifier
reads: where the classifier global-average-pools it, as ResNets, VGGs with a global pool and
MobileNets do, exactly the classifier's input), scaled to unit length. Its component is the
Euclidean distance to the :data:`NEIGHBOUR`-th nearest of a bank of training images' unit
features (the neighbour of the ``k``-th highest cosine similarity). Calibration
keeps the bank from the images behind the head statistics (the even half of the reference
images, at most :data:`BANK` of them) and ranks the component among the other half's distances,
as every component is ranked: no image is ranked against a bank it is in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The most training images a table's bank keeps (``AlarmOptions.knn_bank``'s default).
BANK = 10_000
#: The neighbour whose distance is the component: the paper's 50 for 50,000 CIFAR-10 images,
#: scaled to :data:`BANK`.
NEIGHBOUR = 10
#: Inputs whose similarities to the bank are held at once (a ``[rows, M]`` float32 block).
CHUNK = 1024


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """``features [n, C]`` as float32 rows of unit length (a zero row stays zero)."""
    return torch.nn.functional.normalize(features.float(), dim=1)


@dataclass(frozen=True, eq=False)
class KnnDistance:
    """A bank of unit feature rows and the neighbour whose distance is the component.

    Attributes:
        bank: ``[M, C]`` float32 training images' features, each row of unit length.
        k: the neighbour (``1 <= k <= M``).
    """

    bank: torch.Tensor
    k: int = NEIGHBOUR

    def __post_init__(self) -> None:
        if self.bank.ndim != 2 or self.bank.shape[0] < 1 or self.bank.shape[1] < 1:
            raise ValueError(f"the KNN bank must be [M >= 1, C >= 1], got {list(self.bank.shape)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ValueError(f"the KNN neighbour must be an integer, got {self.k!r}")
        if not 1 <= self.k <= self.bank.shape[0]:
            raise ValueError(
                f"the KNN neighbour must lie in [1, {self.bank.shape[0]}] (the bank's rows), "
                f"got {self.k}"
            )

    @classmethod
    def of(cls, features: torch.Tensor, k: int = NEIGHBOUR) -> KnnDistance:
        """The bank of ``features [M, C]`` scaled to unit rows, ``k`` capped at the rows kept.
        A zero row (an image whose head channels are all 0, as dead ReLUs give) has no
        direction to be near and is left out; a ``ValueError`` when no row is left."""
        rows = features.detach().float()
        rows = rows[torch.linalg.vector_norm(rows, dim=1) > 0]
        if rows.shape[0] == 0:
            raise ValueError(
                f"the KNN bank needs a training image whose head features are not all 0; "
                f"all {features.shape[0]} are"
            )
        bank = unit_rows(rows).contiguous()
        return cls(bank, min(k, int(bank.shape[0])))

    @property
    def channels(self) -> int:
        """The features' width ``C``."""
        return int(self.bank.shape[1])

    def to(self, device: torch.device | str) -> KnnDistance:
        """The same bank on ``device``."""
        return KnnDistance(self.bank.to(device, torch.float32), self.k)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 distances of ``features [B, C]`` to their ``k``-th nearest bank row
        (in :data:`CHUNK`-row blocks; no host sync; a zero row is 1 from every bank row, as far
        as an orthogonal one). The neighbour is found by cosine
        similarity, its distance then taken from the difference of the two rows: ``sqrt(2 -
        2 s)`` loses float32's digits where ``s`` is near 1, and with them the row's
        independence of the batch it came in."""
        z = unit_rows(features)
        bank = self.bank.to(z.device)
        out = []
        for s in range(0, z.shape[0], CHUNK):
            rows = z[s : s + CHUNK]
            kth = (rows @ bank.T).topk(self.k, dim=1).indices[:, -1]
            out.append(torch.linalg.vector_norm(rows - bank[kth], dim=1))
        return torch.cat(out) if out else z.new_zeros(0)


def reference_distance(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The reference formula, for tests: ``[B]`` distances of ``features [B, C]`` to the
    ``k``-th nearest row of ``bank [M, C]``, both scaled to unit rows, by ``torch.cdist`` (no
    cosine shortcut)."""
    d = torch.cdist(unit_rows(features).double(), unit_rows(bank).double())
    return d.sort(dim=1).values[:, k - 1].float()
