"""The quality gate's verdict (realizar.model.quality) from its figures."""

from __future__ import annotations

import torch

from realizar.model.quality import QualityReport, TeacherForced, compare


def test_gate_thresholds() -> None:
    assert QualityReport(100, 0.99, 10.09, 10.0).passed
    assert not QualityReport(100, 0.985, 10.0, 10.0).passed
    assert not QualityReport(100, 1.0, 10.2, 10.0).passed
    assert not QualityReport(100, 1.0, 9.8, 10.0).passed
    same = TeacherForced(torch.tensor([1, 2, 3]), torch.tensor([0.5, 1.0, 1.5]))
    report = compare(same, same)
    assert report.agreement == 1.0 and report.perplexity_ratio == 1.0 and report.tokens == 4
