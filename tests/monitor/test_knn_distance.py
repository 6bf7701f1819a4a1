"""The nearest-neighbour component against pytorch-ood's ``KNN`` and a ``cdist`` reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surprise_monitor.monitor import knn_distance as kd


def test_the_distance_is_pytorch_ood_s_knn_score():
    pytest.importorskip("sklearn")
    from pytorch_ood.detector import KNN

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 16, generator=g) + 0.5
    x = torch.randn(80, 16, generator=g) * 2.0
    knn = kd.KnnDistance.of(bank, k=7)
    oracle = KNN(None, k=7).fit_features(bank, torch.zeros(300, dtype=torch.long))
    expected = np.asarray(oracle.predict_features(x), np.float64)
    np.testing.assert_allclose(knn(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(knn(x), kd.reference_distance(x, bank, 7), rtol=1e-4, atol=1e-5)


def test_chunks_and_a_bank_row_itself():
    """Inputs beyond one chunk give the rows' distances; a bank row is at distance 0 from its
    own (k = 1); ``k`` is capped at the bank's rows; unit rows kept."""
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(50, 8, generator=g)
    knn = kd.KnnDistance.of(bank, k=3)
    x = torch.randn(kd.CHUNK + 17, 8, generator=g)
    torch.testing.assert_close(knn(x), kd.reference_distance(x, bank, 3), rtol=1e-4, atol=1e-5)
    assert torch.allclose(kd.KnnDistance.of(bank, k=1)(bank * 3.0), torch.zeros(50), atol=1e-3)
    assert kd.KnnDistance.of(bank[:4], k=10).k == 4
    torch.testing.assert_close(knn.bank.norm(dim=1), torch.ones(50))
    assert knn(x[:0]).shape == (0,) and knn.channels == 8


@pytest.mark.parametrize(
    ("bank", "k", "message"),
    [
        (torch.zeros(0, 4), 1, r"must be \[M >= 1, C >= 1\]"),
        (torch.ones(5), 1, r"must be \[M >= 1, C >= 1\]"),
        (torch.ones(5, 4), 6, r"must lie in \[1, 5\]"),
        (torch.ones(5, 4), 0, r"must lie in \[1, 5\]"),
        (torch.ones(5, 4), 2.0, "must be an integer"),
    ],
)
def test_a_bad_bank_or_neighbour_is_refused(bank, k, message):
    with pytest.raises(ValueError, match=message):
        kd.KnnDistance(bank, k)


def test_a_zero_row_is_left_out_of_the_bank_and_is_1_from_it():
    """Images whose head features are all 0 (dead ReLUs) have no direction: the bank keeps the
    others (unit rows, ``k`` capped at them) and gives pytorch-ood's score on them; a zero
    input is at distance 1 from every bank row; a bank of zero rows only is refused."""
    pytest.importorskip("sklearn")
    from pytorch_ood.detector import KNN

    g = torch.Generator().manual_seed(2)
    rows = torch.rand(40, 6, generator=g) + 0.1
    rows[::4] = 0.0  # 10 dead images
    knn = kd.KnnDistance.of(rows, k=35)
    alive = rows[rows.norm(dim=1) > 0]
    assert knn.bank.shape == (30, 6) and knn.k == 30
    torch.testing.assert_close(knn.bank.norm(dim=1), torch.ones(30))
    x = torch.randn(12, 6, generator=g)
    oracle = KNN(None, k=30).fit_features(alive, torch.zeros(30, dtype=torch.long))
    np.testing.assert_allclose(knn(x).numpy(), np.asarray(oracle.predict_features(x)),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(knn(torch.zeros(3, 6)), torch.ones(3))
    with pytest.raises(ValueError, match="all 5 are"):
        kd.KnnDistance.of(torch.zeros(5, 6))
