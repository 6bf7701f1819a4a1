"""Why was an input flagged? The region of the image behind one filter, and the training images
that engage that filter most (the paper's Sections 4.3-4.4, Figures 7 and 8).

For one image ``x`` judged against class ``c`` (the caller's label, else the prediction):

1. the filter: the caller's, else the most surprising one (largest ``alpha - mu`` among those
   with ``alpha > P_cn(surprise_pct)``), else the most expected one, else (nothing flagged) the
   filter with the highest percentile rank, ``kind="unflagged"``;
2. the gradient of class c's score with respect to the input pixels that flows only through that
   filter (:func:`monitor.saliency.input_gradient`);
3. SLIC superpixels of the un-normalised image (:mod:`monitor.superpixels`; the normalisation
   comes from ``table.data_source["mean"/"std"]`` or the ``mean=`` / ``std=`` arguments), each
   scored by the gradient it holds (:func:`monitor.superpixels.superpixel_scores`: the sum over
   its pixels of ``max_c |g|``); the top superpixel is the region most important to the filter;
4. optionally the training exemplars of ``(c, filter)`` from the calibration table, each with
   its own region (:mod:`monitor.exemplars`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from monitor.exemplars import Exemplar, exemplars
from monitor.figures import draw_boundary, explanation_figure, save_png
from monitor.saliency import input_gradient
from monitor.superpixels import (
    normalisation,
    ranked_segments,
    region_mask,
    segment,
    superpixel_scores,
    unnormalise,
)

if TYPE_CHECKING:
    from monitor.surprise_monitor import SurpriseMonitor

KINDS = ("surprise", "expectation", "unflagged")


@dataclass
class Explanation:
    """One image's explanation for one filter (arrays are NumPy, on the CPU)."""

    image: np.ndarray = field(repr=False)  # [H, W, C] the un-normalised picture, in [0, 1]
    segments: np.ndarray = field(repr=False)  # [H, W] int64 superpixel labels 0..S-1
    scores: np.ndarray = field(repr=False)  # [S] gradient score of each superpixel
    top_segment: int  # the highest-scored superpixel
    mask: np.ndarray = field(repr=False)  # [H, W] bool: the top region
    gradient: np.ndarray = field(repr=False)  # [C, H, W] the filter-restricted input gradient
    filter: int
    kind: str  # "surprise", "expectation" or "unflagged"
    cls: int  # the class the filter was judged against: the label if given, else the prediction
    prediction: int
    label: int | None
    alpha: float
    mu: float
    percentile: float  # alpha's percentile rank within the class's calibration alphas
    low: float  # P_cn(expectation_pct)
    high: float  # P_cn(surprise_pct)
    surprise_pct: float
    expectation_pct: float
    layer: str
    n_segments: int
    class_names: tuple[str, ...] = ()
    reason: str = ""  # how the filter was chosen
    exemplar_class: int = -1
    exemplars: list[Exemplar] = field(default_factory=list, repr=False)

    def class_name(self, c: int | None) -> str:
        if c is None:
            return "?"
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)

    @property
    def num_segments(self) -> int:
        return int(self.scores.shape[0])

    def title(self) -> str:
        verb = {"surprise": "surprising", "expectation": "expected", "unflagged": "unflagged"}
        return (
            f"predicted '{self.class_name(self.prediction)}'"
            + (f" (true '{self.class_name(self.label)}')" if self.label is not None else "")
            + f": filter {self.filter} of {self.layer}, {verb[self.kind]} for "
            f"'{self.class_name(self.cls)}'"
        )

    def caption(self) -> str:
        """The input's caption: predicted (true) class, filter, kind, alpha against the class's
        percentiles."""
        head = self.class_name(self.prediction)
        if self.label is not None:
            head += f" ({self.class_name(self.label)})"
        return (
            f"{head}\nfilter {self.filter}: {self.kind}\n"
            f"alpha {self.alpha:.3g} (percentile {self.percentile:.1f})\n"
            f"class mean {self.mu:.3g}\n"
            f"P{self.expectation_pct:g} {self.low:.3g} | P{self.surprise_pct:g} {self.high:.3g}"
        )

    def render(
        self,
        path: str | Path | None = None,
        *,
        scale: int | None = None,
        color: tuple[int, int, int] = (255, 255, 0),
    ) -> Image.Image:
        """The input upscaled (nearest, default: longer side >= 256 px) with the top region's
        boundary drawn in ``color``; written as PNG to ``path`` when given."""
        rgb = draw_boundary(self.image, self.mask, scale=scale, color=color)
        if path is not None:
            save_png(rgb, path)
        return Image.fromarray(rgb)

    def save_figure(self, path: str | Path, **kwargs: Any) -> Path:
        """The input beside its training exemplars, captioned, as one PNG (matplotlib, Agg)."""
        return explanation_figure(self, path, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no arrays)."""
        return {
            "filter": self.filter,
            "kind": self.kind,
            "reason": self.reason,
            "layer": self.layer,
            "class": self.cls,
            "class_name": self.class_name(self.cls),
            "prediction": self.prediction,
            "prediction_name": self.class_name(self.prediction),
            "label": self.label,
            "alpha": self.alpha,
            "mu": self.mu,
            "percentile": self.percentile,
            "low": self.low,
            "high": self.high,
            "n_segments": self.n_segments,
            "segments_found": self.num_segments,
            "top_segment": self.top_segment,
            "top_region_pixels": int(self.mask.sum()),
            "exemplars": [{"index": e.index, "alpha": e.alpha} for e in self.exemplars],
        }


def _one_image(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"explain takes one [C, H, W] or [1, C, H, W] image, got {tuple(x.shape)}")
    return x


def choose_filter(report: Any, filter: int | None) -> tuple[int, str, str]:
    """``(filter, kind, reason)`` for sample 0 of a :class:`~monitor.report.MonitorReport`."""
    n_filters = int(report.alpha.shape[1])
    if filter is not None:
        filter = int(filter)
        if not 0 <= filter < n_filters:
            raise ValueError(f"filter {filter} is outside the layer's {n_filters} filters")
        kind = (
            "surprise" if bool(report.surprise[0, filter])
            else "expectation" if bool(report.expectation[0, filter])
            else "unflagged"
        )  # fmt: skip
        return filter, kind, "chosen by the caller"
    sur = report.surprising_filters(0)
    if sur:
        return sur[0].filter, "surprise", f"most surprising of {len(sur)} surprising filters"
    exp = report.expected_filters(0)
    if exp:
        return exp[0].filter, "expectation", f"most expected of {len(exp)} expected filters"
    pct, dev = report.percentile[0].double(), report.deviation[0].double()
    best = max(range(n_filters), key=lambda n: (float(pct[n]), float(dev[n])))
    return best, "unflagged", "no filter is flagged; the filter with the highest percentile"


def explain(
    monitor: SurpriseMonitor,
    x: torch.Tensor,
    filter: int | None = None,
    label: int | None = None,
    n_segments: int = 50,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    exemplars_k: int | None = None,
    dataset: Any = None,
    exemplar_class: int | None = None,
    reduce: str = "sum",
    slic_kwargs: Mapping[str, Any] | None = None,
) -> Explanation:
    """Explain one image ``x`` (normalised, ``[C, H, W]`` or ``[1, C, H, W]``) for one filter.

    Args:
        filter: the filter to explain; default: the most surprising, else the most expected one.
        label: the true class if known (the filter is judged against it); else the prediction.
        n_segments: SLIC's target superpixel count (the paper uses 50).
        mean, std: the normalisation of ``x`` when ``table.data_source`` does not record it.
        exemplars_k: training exemplars to attach; default: the table's top-k when the images can
            be found (``table.data_source`` or ``dataset``), else none. 0 for none.
        dataset: the calibration dataset (index order, normalised tensors), for the exemplars.
        exemplar_class: whose exemplars to show (default: the class the filter was judged
            against, whose top-k the table stores).
        reduce: superpixel scoring, ``"sum"`` (default) or ``"mean"`` of ``max_c |g|``.
        slic_kwargs: extra arguments for ``skimage.segmentation.slic``.
    """
    x = _one_image(x)
    table = monitor.table
    mean_t, std_t = normalisation(table.data_source, mean, std)
    device = next(iter(monitor.model.parameters()), torch.empty(0)).device
    x = x.to(device)
    previous = monitor.last_report
    with torch.inference_mode(False):  # normal label tensors, even in a caller's inference_mode
        labels = None if label is None else torch.tensor([int(label)])
        report = monitor.inspect(x, labels=labels)
    monitor.last_report = previous  # explaining is not monitoring: leave the drop-in's report
    n, kind, reason = choose_filter(report, filter)
    c = int(report.classes[0])
    grad = input_gradient(
        monitor.model, table.layer, x, c, n, score=table.score,
        output_to_logits=monitor.probe.output_to_logits,
    )[0].cpu()  # fmt: skip
    image = unnormalise(x[0], mean_t, std_t)
    segs = segment(image, n_segments, **dict(slic_kwargs or {}))
    scores = superpixel_scores(grad, segs, reduce=reduce)
    top = int(ranked_segments(scores)[0])
    low = float(table.value_at(monitor.expectation_pct)[c, n])
    high = float(table.value_at(monitor.surprise_pct)[c, n])
    expl = Explanation(
        image=image, segments=segs, scores=scores, top_segment=top,
        mask=region_mask(segs, [top]), gradient=grad.numpy(), filter=n, kind=kind, cls=c,
        prediction=int(report.predictions[0]), label=None if label is None else int(label),
        alpha=float(report.alpha[0, n]), mu=float(report.mu[0, n]),
        percentile=float(report.percentile[0, n]), low=low, high=high,
        surprise_pct=monitor.surprise_pct, expectation_pct=monitor.expectation_pct,
        layer=table.layer, n_segments=n_segments, class_names=tuple(table.class_names),
        reason=reason, exemplar_class=c if exemplar_class is None else int(exemplar_class),
    )  # fmt: skip
    have_source = dataset is not None or (
        table.data_source is not None and table.data_source.get("kind") in ("imagefolder", "npz")
    )
    if exemplars_k is None:
        exemplars_k = _table_top_k(table) if have_source else 0
    if exemplars_k > 0:
        expl.exemplars = exemplars(
            monitor.model, table, expl.exemplar_class, n, mean=mean_t, std=std_t, k=exemplars_k,
            dataset=dataset, n_segments=n_segments, reduce=reduce,
            output_to_logits=monitor.probe.output_to_logits, slic_kwargs=slic_kwargs,
        )  # fmt: skip
    return expl


def _table_top_k(table: Any) -> int:
    try:
        return int(table.top_k)
    except ValueError:  # no exemplars stored and no file to read them from
        return 0
