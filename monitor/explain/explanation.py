"""Why was an input flagged? The region of the image behind one filter, and the training images
that engage that filter most (the paper's Sections 4.3-4.4, Figures 7 and 8).

For one image ``x`` judged against class ``c`` (the caller's label, else the prediction):

1. the filter (:func:`surprise_monitor.monitor.explain.choice.choose_filter`): the caller's,
   else a surprising one that **fired** (``alpha > P_cn(surprise_pct)`` and ``alpha > 0``),
   the one furthest beyond the class's range (``(alpha - P99.9) / (P99.9 - P50)``), else the
   most expected one, else a surprising one that did not fire, else (nothing flagged) the
   filter with the highest percentile rank, ``kind="unflagged"``. When no surprising filter
   fired, ``note`` says so: "no surprising filter fired; the alarm comes from <component>";
2. the gradient of class c's score with respect to the input pixels that flows only through that
   filter (:func:`surprise_monitor.monitor.explain.saliency.input_gradient`);
3. SLIC superpixels of the un-normalised image (:mod:`.superpixels`; the
   normalisation comes from ``table.data_source["mean"/"std"]`` or the ``mean=`` / ``std=``
   arguments), each scored by the gradient it holds (the sum over its pixels of ``max_c |g|``);
   the top superpixel is the region most important to the filter. **No region** is drawn
   (``top_segment = None``, an empty mask, "no region" on the figure) when every superpixel
   scores the same (an all-zero gradient: a filter that does not fire), or for a surprising
   filter that did not fire; the tie-break never draws superpixel 0;
4. how sure it is: ``filter_share``, the share of the class score's first-order gradient at the
   layer that flows through the filter, ``|alpha_n| / sum_m |alpha_m|``, and ``region_share``,
   the region's share of the saliency, ``scores[top] / sum(scores)`` (both in [0, 1]). A low
   ``filter_share`` means the filter carries little of the class score; a low ``region_share``
   means the region holds little of the filter's saliency (it is spread over the image). Either
   way the explanation is weak: look at other filters, or at the alarm's component;
5. optionally the training exemplars of ``(c, filter)`` from the calibration table, each with
   its own region (:mod:`surprise_monitor.monitor.explain.exemplars`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from surprise_monitor.monitor.explain import superpixels
from surprise_monitor.monitor.explain.choice import (
    Choice,
    alarm_component,
    choose_filter,
    filter_share,
    no_fired_note,
)
from surprise_monitor.monitor.explain.exemplars import Exemplar, exemplars
from surprise_monitor.monitor.explain.figures import (
    DIMMED,
    OUTLINE,
    Panel,
    draw_boundary,
    grid_figure,
    save_png,
)
from surprise_monitor.monitor.explain.inputs import judged_on_device, one_image
from surprise_monitor.monitor.explain.saliency import input_gradient
from surprise_monitor.monitor.judge import HasJudge, Judge, judge_of
from surprise_monitor.monitor.loading.images import SOURCE_KINDS
from surprise_monitor.monitor.report import MonitorReport
from surprise_monitor.monitor.table import CalibrationTable

#: How a filter's kind reads in figures and summaries: "expected" alone would read as "normal",
#: but an expected filter is one the class usually has strongly and this image lacks.
KIND_WORDS = {
    "surprise": "SURPRISING (rarely this strong in the class)",
    "expectation": "MISSING (expected in the class, absent here)",
    "unflagged": "not flagged (its highest percentile)",
}


@dataclass
class Explanation:
    """One image's explanation for one filter (arrays are NumPy, on the CPU)."""

    image: np.ndarray = field(repr=False)  # [H, W, C] the un-normalised picture, in [0, 1]
    segments: np.ndarray = field(repr=False)  # [H, W] int64 superpixel labels 0..S-1
    scores: np.ndarray = field(repr=False)  # [S] gradient score of each superpixel
    top_segment: int | None  # the highest-scored superpixel; None: no region (all tie)
    mask: np.ndarray = field(repr=False)  # [H, W] bool: the top region (empty: no region)
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
    # A misclassification (label given, another prediction): the prediction's exemplars too.
    prediction_exemplars: list[Exemplar] = field(default_factory=list, repr=False)
    # Why a region is missing or weak: "no surprising filter fired; the alarm comes from ...",
    # "no region: ..."; "" for a surprising filter that fired and a region.
    note: str = ""
    fired: bool = True  # the filter fires on the input: alpha > 0 and a non-zero gradient
    alarm_component: str = ""  # the alarm's component with the smallest tail rank
    filter_share: float = 0.0  # |alpha_n| / sum_m |alpha_m|: the filter's share of the score
    region_share: float = 0.0  # scores[top] / sum(scores): the region's share of the saliency

    def class_name(self, c: int | None) -> str:
        """Class ``c``'s name (``"?"`` for ``None``, the number when the table has no name)."""
        if c is None:
            return "?"
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)

    @property
    def has_region(self) -> bool:
        """Whether a region is drawn (``top_segment`` is not ``None``)."""
        return self.top_segment is not None

    @property
    def num_segments(self) -> int:
        """Superpixels SLIC found (it can differ a little from ``n_segments``)."""
        return int(self.scores.shape[0])

    def title(self) -> str:
        """The figure's title: prediction, label, filter and its kind for the judged class."""
        head = f"predicted '{self.class_name(self.prediction)}'"
        if self.label is not None:
            head += f", true '{self.class_name(self.label)}'"
        title = (
            f"{head}: filter {self.filter} of {self.layer} is "
            f"{KIND_WORDS[self.kind]} for '{self.class_name(self.cls)}'"
        )
        return f"{title}\n{self.note}" if self.note else title

    def caption(self) -> str:
        """The input's caption: which class is the prediction and which the label, the filter's
        kind, and alpha against the judged class's calibration (its percentile and usual range)."""
        lines = [f"predicted: {self.class_name(self.prediction)}"]
        if self.label is not None:
            lines.append(f"true: {self.class_name(self.label)}")
        name = self.class_name(self.cls)
        lines += [
            f"filter {self.filter}: {KIND_WORDS[self.kind].split(' (')[0]}",
            f"alpha {self.alpha:.3g}, percentile {self.percentile:.1f}",
            f"of '{name}' training images",
            f"usual P{self.expectation_pct:g}..P{self.surprise_pct:g}: "
            f"{self.low:.3g}..{self.high:.3g}",
            f"(mean {self.mu:.3g})",
            f"filter's share of the score {self.filter_share:.0%}",
            f"region's share of the saliency {self.region_share:.0%}"
            if self.has_region
            else "no region drawn",
        ]
        return "\n".join(lines)

    def exemplar_caption(self, ex: Exemplar, cls: int) -> str:
        """An exemplar's caption: its class, its file (or dataset index) and its alpha."""
        where = f"#{ex.index}"
        if ex.path is not None:
            where = "/".join(Path(ex.path).parts[-2:])
        return (
            f"'{self.class_name(cls)}' training image\n{where}\n"
            f"alpha {ex.alpha:.3g} (rank {ex.rank + 1})"
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
        """The input beside its training exemplars, each masked to its own region, captioned,
        with a legend, as one PNG (matplotlib, Agg; ``kwargs``: ``panel_inches``, ``dpi``).
        For a misclassification a second row shows the predicted class's exemplars."""
        first = [Panel(draw_boundary(self.image, self.mask), self.caption())]
        first += [self._exemplar_panel(ex, self.exemplar_class) for ex in self.exemplars]
        rows: list[list[Panel | None]] = [first]
        notes = [""]
        if self.prediction_exemplars:
            second: list[Panel | None] = [None]
            second += [self._exemplar_panel(e, self.prediction) for e in self.prediction_exemplars]
            rows.append(second)
            notes.append(
                f"below: filter {self.filter}'s exemplars of the prediction "
                f"'{self.class_name(self.prediction)}'"
            )
        legend = [(OUTLINE, f"yellow outline: the region that drives filter {self.filter} most")]
        if not self.has_region:  # no outline on the input: the title and caption say why
            ex = self.exemplars or self.prediction_exemplars
            legend = [(OUTLINE, f"yellow outline: each training image's region for filter "
                       f"{self.filter} (none on the input)")] if ex else []  # fmt: skip
        if self.exemplars or self.prediction_exemplars:
            legend.append((DIMMED, "dimmed: the rest of each training image (outside its region)"))
        width = int(13 * float(kwargs.get("panel_inches", 2.4)) * max(len(r) for r in rows))
        title = "\n".join(textwrap.fill(line, max(width, 30)) for line in self.title().split("\n"))
        return grid_figure(rows, title, path, legend=legend, notes=notes, **kwargs)

    def _exemplar_panel(self, ex: Exemplar, cls: int) -> Panel:
        """An exemplar's picture, dimmed outside its region, and its caption."""
        return Panel(draw_boundary(ex.image, ex.mask, dim=0.35), self.exemplar_caption(ex, cls))

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
            "has_region": self.has_region,
            "top_region_pixels": int(self.mask.sum()),
            "note": self.note,
            "fired": self.fired,
            "alarm_component": self.alarm_component,
            "filter_share": self.filter_share,
            "region_share": self.region_share,
            "exemplars": [_exemplar_dict(e) for e in self.exemplars],
            "prediction_exemplars": [_exemplar_dict(e) for e in self.prediction_exemplars],
        }


def _exemplar_dict(e: Exemplar) -> dict[str, Any]:
    """An exemplar's JSON summary."""
    return {"index": e.index, "alpha": e.alpha, "path": e.path}


def explain(
    target: Judge | HasJudge,
    x: torch.Tensor,
    label: int | None = None,
    *,
    filter: int | None = None,
    n_segments: int = 50,
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
        target: the judge, or a :class:`~surprise_monitor.monitor.SurpriseMonitor` (its
            judge is used; its ``last_report`` is left alone).
        label: the true class if known (the filter is judged against it); else the prediction.
        filter: the filter to explain; default: the most surprising, else the most expected one.
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
    x = one_image(x, "explain")
    judge = judge_of(target)
    table, t = judge.table, judge.thresholds
    mean_t, std_t = superpixels.normalisation(table.data_source, mean, std)
    x, report = judged_on_device(judge, x, label)
    c = int(report.classes[0])
    choice = choose_filter(report, filter, table, t.surprise_pct)
    n, grad, choice = _filter_gradient(judge, x, c, choice, report)
    zero = not bool(grad.abs().max() > 0)
    image = superpixels.unnormalise(x[0].float(), mean_t, std_t)
    segs, scores, _ = superpixels.ranked_superpixels(
        image, grad, n_segments, reduce=reduce, slic_kwargs=slic_kwargs
    )
    top = superpixels.top_region(scores) if choice.region and not zero else None
    alpha = float(report.alpha[0, n])
    expl = Explanation(
        image=image, segments=segs, scores=scores, top_segment=top,
        mask=superpixels.region_mask(segs, [] if top is None else [top]), gradient=grad.numpy(),
        filter=n, kind=choice.kind, cls=c, prediction=int(report.predictions[0]),
        label=None if label is None else int(label), alpha=alpha,
        mu=float(report.mu[0, n]), percentile=float(report.percentile[0, n]),
        low=float(table.value_at(t.expectation_pct)[c, n]),
        high=float(table.value_at(t.surprise_pct)[c, n]),
        surprise_pct=t.surprise_pct, expectation_pct=t.expectation_pct,
        layer=table.layer, n_segments=n_segments, class_names=tuple(table.class_names),
        reason=choice.reason, exemplar_class=c if exemplar_class is None else int(exemplar_class),
        note=_note(choice, n, top, zero), fired=alpha > 0 and not zero,
        alarm_component=alarm_component(report), filter_share=filter_share(report, n),
        region_share=superpixels.region_share(scores, top),
    )  # fmt: skip
    k = _exemplar_count(table, exemplars_k, dataset)
    if k > 0:
        classes = [expl.exemplar_class]
        if exemplar_class is None and label is not None and expl.prediction != int(label):
            classes.append(expl.prediction)  # a misclassification: the prediction's too
        found = [
            exemplars(
                judge.model, table, cls, n, mean=mean_t, std=std_t, k=k, dataset=dataset,
                n_segments=n_segments, reduce=reduce, output_to_logits=judge.output_to_logits,
                slic_kwargs=slic_kwargs,
            )
            for cls in classes
        ]  # fmt: skip
        expl.exemplars = found[0]
        expl.prediction_exemplars = found[1] if len(found) > 1 else []
    return expl


#: Surprising filters that fired whose gradient is tried, best first, for one that is not zero.
MAX_CANDIDATES = 8


def _filter_gradient(
    judge: Judge, x: torch.Tensor, c: int, choice: Choice, report: MonitorReport
) -> tuple[int, torch.Tensor, Choice]:
    """``(filter, its restricted input gradient [C, H, W] on the CPU, choice)``: for a
    surprising filter that fired, the first of the best ``MAX_CANDIDATES`` whose gradient is
    not zero; when all are zero, the first, with no region and a note that none fired."""
    table = judge.table

    def gradient(n: int) -> torch.Tensor:
        return input_gradient(
            judge.model, table.layer, x, c, n, class_output=table.class_output,
            output_to_logits=judge.output_to_logits,
        )[0].float().cpu()  # fmt: skip

    tried = choice.candidates[:MAX_CANDIDATES] or (choice.filter,)
    first = None
    for n in tried:
        grad = gradient(n)
        if bool(grad.abs().max() > 0):
            return n, grad, choice._replace(filter=n)
        first = (n, grad) if first is None else first
    assert first is not None
    if not choice.candidates:
        return first[0], first[1], choice
    note = no_fired_note(report, 0) + " (the surprising filters' gradients are zero)"
    return first[0], first[1], choice._replace(note=note, region=False)


def _note(choice: Choice, n: int, top: int | None, zero: bool) -> str:
    """The explanation's note: the choice's ("no surprising filter fired; ...") and, without a
    region, why there is none."""
    parts = [choice.note] if choice.note else []
    if top is None:
        if zero:
            why = "its gradient is zero (it does not fire on this input)"
        elif not choice.region:
            why = "a surprising filter that did not fire is not drawn"
        else:
            why = "every superpixel scores the same"
        parts.append(f"no region: filter {n}: {why}")
    return "; ".join(parts)


def _exemplar_count(table: CalibrationTable, asked: int | None, dataset: Any) -> int:
    """Exemplars to attach: ``asked``, else the table's top-k when the training images can be
    found (``dataset`` or a readable ``data_source``), else 0."""
    if asked is not None:
        return asked
    source = table.data_source
    if dataset is None and (source is None or source.get("kind") not in SOURCE_KINDS):
        return 0
    try:
        return int(table.top_k)
    except ValueError:  # no exemplars stored and no file to read them from
        return 0
