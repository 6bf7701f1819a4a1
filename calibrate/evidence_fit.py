"""The ``learned`` evidence's fit: an L2-regularised logistic regression on
:func:`~surprise_monitor.monitor.learned_evidence.rank_features`, telling clean held-out
images (0) from synthetic shifts of them (1).

The objective is scikit-learn's ``LogisticRegression(C=c)`` with sample weights (the
intercept not penalised): ``0.5 |w|^2 + c sum_i s_i log(1 + exp(-y_i (w . x_i + b)))``, ``y``
in ``{-1, 1}``, minimised in float64 by L-BFGS (a strong Wolfe line search). The weights ``s``
give the clean images half the total and each shift an equal share of the other half (so no
shift outweighs another, whatever its size), scaled to average 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from surprise_monitor.monitor.learned_evidence import LearnedEvidence, rank_features

#: The inverse regularisation strength (scikit-learn's ``C``).
REGULARISATION_C = 1.0
#: L-BFGS iterations at most.
MAX_ITERATIONS = 500


def sample_weights(clean: int, shifted: list[int]) -> torch.Tensor:
    """``[clean + sum(shifted)]`` float64 weights: half the total to the clean rows, an equal
    share of the other half to each shift's rows, averaging 1."""
    if clean < 1 or not shifted or min(shifted) < 1:
        raise ValueError("the learned evidence needs clean images and images of every shift")
    parts = [torch.full((clean,), 0.5 / clean, dtype=torch.float64)]
    parts += [torch.full((n,), 0.5 / len(shifted) / n, dtype=torch.float64) for n in shifted]
    w = torch.cat(parts)
    return w * (w.numel() / w.sum())


def logistic_fit(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, c: float = REGULARISATION_C
) -> tuple[torch.Tensor, float]:
    """Coefficients ``[D]`` (float64) and intercept minimising the module docstring's objective
    for features ``x [n, D]``, labels ``y [n]`` in ``{0, 1}`` and ``weights [n]``."""
    if not c > 0:
        raise ValueError(f"the regularisation C must be > 0, got {c}")
    with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller is in
        return _minimise(x.detach().clone().double(), y.detach().clone().double(),
                         weights.detach().clone().double(), c)  # fmt: skip


def _minimise(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, c: float
) -> tuple[torch.Tensor, float]:
    """:func:`logistic_fit` on float64 tensors, with autograd on."""
    sign = y * 2.0 - 1.0
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [params], lr=1.0, max_iter=MAX_ITERATIONS, tolerance_grad=1e-10,
        tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def objective() -> torch.Tensor:
        """The penalised, weighted log-loss (its gradient left in ``params.grad``)."""
        opt.zero_grad()
        margin = sign * (x @ params[:-1] + params[-1])
        loss = (
            0.5 * params[:-1].square().sum() + c * (w * torch.nn.functional.softplus(-margin)).sum()
        )
        loss.backward()
        return loss

    opt.step(objective)
    out = params.detach()
    return out[:-1].clone(), float(out[-1])


def fit_learned_evidence(
    clean: torch.Tensor,
    shifted: Mapping[str, torch.Tensor],
    floor: float,
    c: float = REGULARISATION_C,
) -> LearnedEvidence:
    """The learned evidence fitted on the tail ranks ``[n, J]`` of clean held-out images and of
    each shift's images (``floor = 1/(m + 1)`` of the components' reference); its reference
    is the clean images' decision values."""
    rows = [clean.float(), *(r.float() for r in shifted.values())]
    x = torch.cat([rank_features(r, floor) for r in rows])
    y = torch.cat([torch.zeros(len(clean))] + [torch.ones(len(r)) for r in shifted.values()])
    weights = sample_weights(len(clean), [len(r) for r in shifted.values()])
    coef, bias = logistic_fit(x, y, weights, c)
    fitted = LearnedEvidence(coef.float(), bias, floor, torch.zeros(2))
    reference = torch.sort(fitted.decision(clean.float()).cpu()).values.contiguous()
    return LearnedEvidence(coef.float(), bias, floor, reference)
