"""bench.alarms.alarm_kinds: each alarmed input's kind is the report's, and the table's shares."""

from __future__ import annotations

import torch

from bench.alarms import alarm_kinds as ak
from surprise_monitor.monitor import atypicality

NAMES = ["expectation_mass", "stage_energy:a", "energy", "stage_distance:a", "stage_distance:h",
         "head_distance:h", "knn_distance:h"]  # fmt: skip


def test_only_alarmed_inputs_get_the_report_s_kind():
    """Gate open at the head layer -> features, at an early stage -> low level; gate shut,
    energy furthest -> class evidence, the KNN distance furthest -> features (its column in
    ``energy+knn``); inputs that did not alarm are left out."""
    base = [0.5] * len(NAMES)
    rows = [
        (base[:4] + [1e-6, 0.5, 0.5], atypicality.GATE_OFFSET + 1, True),  # head stage distance
        (base[:3] + [1e-6, 0.5, 0.5, 0.5], atypicality.GATE_OFFSET + 1, True),  # early stage
        (base[:2] + [1e-5, 0.5, 0.5, 0.5, 0.2], 20.0, True),  # energy
        (base[:2] + [0.2, 0.5, 0.5, 0.5, 1e-5], 20.0, True),  # the KNN distance
        (base[:2] + [1e-5, 0.5, 0.5, 0.5, 0.2], 20.0, False),  # not alarmed
    ]
    ranks = torch.tensor([r for r, _, _ in rows])
    scores = torch.tensor([s for _, s, _ in rows])
    alarmed = torch.tensor([a for _, _, a in rows])
    got = ak.alarm_kinds(NAMES, ranks, scores, alarmed, None, "energy+knn")
    assert got == ["features", "low_level", "class_evidence", "features"]
    want = [atypicality.alarm_kind(NAMES, r, s, None, "energy+knn") for r, s, a in rows if a]
    assert got == want


def test_the_table_gives_each_family_s_alarms_and_shares():
    geometry = {"class_evidence": 1, "low_level": 2, "features": 1}
    far = {"class_evidence": 0, "low_level": 0, "features": 3}
    results = {"vgg_plain": {"geometry": geometry, "far": far}}
    text = ak.markdown(results)
    row = next(line for line in text.splitlines() if line.startswith("| VGG (no BN) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "4: 25 / 50 / 25"  # geometry, the first family
    assert cells[ak.FAMILIES.index("far") + 1] == "3: 0 / 0 / 100"
    assert cells[ak.FAMILIES.index("blur") + 1] == "0"
