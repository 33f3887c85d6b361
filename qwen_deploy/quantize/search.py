"""Per-group SmoothQuant choices measured on calibration rows: the migration strength alpha, and
which groups stay in floating point.

alpha: for a group (the linear layers reading one activation X [tokens, K]) and a candidate alpha,
the smoothing s gives X' = X / s, quantized per tensor with the static scale calibration's absmax
gives, and W' = diag(s) W, quantized per output channel, exactly as the graph will hold them. The
error is the mean over the sampled tokens of ||Q(X') Q(W') - X W||^2 / ||X W||^2: every token
counts the same, as it does in top-1 agreement and perplexity (a plain Frobenius ratio would be
decided by the few tokens with massive activations). Evenly spaced output columns (COLUMNS per
group) bound the cost; the scales still come from every column.

Floating point: the groups whose INT8 error stands out from the other groups', as the logits see
it (LogitLens) or as the residual stream it is added to does, within a budget (plan_smoothquant).
A group's own relative output error ranks them badly on the real model: late down_proj layers'
errors reach the logits directly, and early ones' disturb every later layer, while middle layers'
errors of the same relative size fade.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .calibration import Activations
from .linears import Linear, final_norm, residual_after
from .smoothing import Smoother, smoothing_factors
from .smoothquant import quantize_per_channel

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
COLUMNS = 256
LOGIT_COLUMNS = 1024
RESIDUAL_WRITERS = ("o_proj", "down_proj")
# A group is worth keeping in floating point only when INT8 costs it this many times the median
# group's error: the few outlier layers, not a model's worth of ordinary ones. On the real model
# the down_proj layers scoring under ~5 moved perplexity by less than 0.4% each when quantized
# alone; a random model's groups all score 1-2.
OUTLIER = 5.0


@dataclass(frozen=True)
class Choice:
    """The alpha a group gets and the relative output error it leaves."""

    alpha: float
    error: float


def sample_columns(width: int, count: int = COLUMNS) -> np.ndarray:
    """`count` evenly spaced output columns of `width` (all when fewer)."""
    return np.unique(np.linspace(0, width - 1, min(count, width)).round().astype(np.int64))


def int8_output(
    rows: np.ndarray,
    weight: np.ndarray,
    act_max: np.ndarray,
    weight_max: np.ndarray,
    alpha: float,
) -> np.ndarray:
    """rows [T, K] @ weight [K, n] as the INT8 graph computes it after smoothing with `alpha`."""
    s = smoothing_factors(act_max, weight_max, alpha)
    scale = max(float((act_max / s).max()), 1e-8) / 127.0
    x = np.clip(np.rint(rows / s / scale), -128, 127) * scale
    codes, w_scales = quantize_per_channel(weight * s[:, None])
    return (x.astype(np.float32) @ codes.astype(np.float32)) * w_scales


def output_error(
    rows: np.ndarray,
    weight: np.ndarray,
    act_max: np.ndarray,
    weight_max: np.ndarray,
    alpha: float,
    reference: np.ndarray | None = None,
) -> float:
    """Mean per-token relative error of the INT8 group on `rows` [T, K] for `weight` [K, n]
    (sampled columns), smoothed with `alpha`."""
    if reference is None:
        reference = rows @ weight
    err = ((int8_output(rows, weight, act_max, weight_max, alpha) - reference) ** 2).sum(axis=1)
    return float((err / np.maximum((reference**2).sum(axis=1), 1e-30)).mean())


def choose_alpha(
    rows: np.ndarray,
    weight: np.ndarray,
    act_max: np.ndarray,
    weight_max: np.ndarray,
    alphas: tuple[float, ...] = ALPHAS,
) -> Choice:
    """The alpha of `alphas` with the smallest output error (the first on ties)."""
    reference = rows @ weight
    errors = [output_error(rows, weight, act_max, weight_max, a, reference) for a in alphas]
    best = int(np.argmin(errors))
    return Choice(float(alphas[best]), errors[best])


def keep_float(scores: dict[str, float], params: dict[str, int], budget: float) -> list[str]:
    """The groups to leave in floating point: highest score (times the median group's error)
    first, while their weights fit in `budget` (a fraction of all linear weights; a group too
    large to fit is passed over) and their score is over OUTLIER."""
    allowed = budget * sum(params.values())
    kept: list[str] = []
    for name in sorted(scores, key=lambda n: (-scores[n], n)):
        if scores[name] > OUTLIER and params[name] <= allowed:
            kept.append(name)
            allowed -= params[name]
    return kept


class LogitLens:
    """What an error added to the residual stream does to the logits, to first order: divided by
    each token's final RMS, scaled by the final norm weight, through LOGIT_COLUMNS columns of the
    LM head; relative to the logits on those columns, averaged over tokens."""

    def __init__(
        self, rms: np.ndarray, norm_weight: np.ndarray, head_rows: np.ndarray, head: np.ndarray
    ):
        self.scale = norm_weight[None, :] / np.maximum(rms, 1e-30)  # [T, H]
        self.head = head
        self.norm = np.maximum(((head_rows @ head) ** 2).sum(axis=1), 1e-30)

    def error(self, delta: np.ndarray) -> float:
        return float(((((delta * self.scale) @ self.head) ** 2).sum(axis=1) / self.norm).mean())


@dataclass(frozen=True)
class Sensitivity:
    """What INT8 costs a group that may stay in floating point: its error as the logits see it
    (LogitLens) and relative to the residual stream it writes (per token, mean), each as a
    multiple of the median group's; the score is the larger multiple."""

    logits: float
    residual: float
    score: float


@dataclass
class Plan:
    """SmoothQuant's per-group choices, by group input tensor."""

    alphas: dict[str, float]
    sensitivity: dict[str, Sensitivity]  # the groups that may stay in floating point
    keep_float: list[str]  # most sensitive first


def _writers(smoother: Smoother) -> dict[str, str]:
    """Group input -> the residual stream after it, for groups writing the residual stream."""
    graph = smoother.rw.model.graph
    return {
        g.input: residual_after(graph, g.linears[0])
        for g in smoother.groups
        if g.linears[0].role in RESIDUAL_WRITERS
    }


def measured_tensors(smoother: Smoother) -> list[str]:
    """What calibration must capture for plan_smoothquant: each group's input, the residual
    stream after each o_proj and down_proj, and the final RMS of every token."""
    head = next(x for x in smoother.linears if x.role == "lm_head")
    rms = final_norm(smoother.rw.model.graph, head)[0]
    return [*smoother.activations, *_writers(smoother).values(), rms]


def _weight(smoother: Smoother, lin: Linear, columns: int | None = None) -> np.ndarray:
    weight = smoother.rw.source.array(lin.weight)
    if columns is not None:
        weight = weight[:, sample_columns(lin.shape[1], columns)]
    return np.asarray(weight, np.float32)


def _median_multiples(errors: dict[str, float]) -> dict[str, float]:
    median = max(float(np.median(list(errors.values()))), 1e-30)
    return {name: error / median for name, error in errors.items()}


def plan_smoothquant(
    smoother: Smoother,
    activations: Activations,
    alpha: float | None,
    budget: float,
    progress: bool = True,
) -> Plan:
    """Each group's alpha (searched when `alpha` is None), and the groups to keep in floating
    point within `budget` (a fraction of all linear weights), the most sensitive first.

    Only the groups that write the residual stream (o_proj, down_proj) are ranked: q/k/v and
    gate/up reach it through them, and cost the real model next to nothing once smoothed; the
    LM head is a quarter of a small model's weights. Two measures, because INT8 errors hurt in
    two ways on the real model: late layers' errors reach the logits directly (the logit lens
    sees them), early layers' disturb every later layer, through the attention-sink tokens first
    (their share of the residual stream shows it). Both judge a choice on rows that did not set
    its scales, as at run time: on rows that set their own scales a search never sees
    saturation, and favors alphas that overfit calibration's per-channel maxima.
    """
    head = next(g for g in smoother.groups if g.linears[0].role == "lm_head")
    rms, norm = final_norm(smoother.rw.model.graph, head.linears[0])
    lens = LogitLens(
        activations.rows[rms],
        np.asarray(smoother.rw.source.array(norm), np.float32),
        activations.rows[head.input],
        _weight(smoother, head.linears[0], LOGIT_COLUMNS),
    )
    writers = _writers(smoother)
    alphas, logits, residual = {}, {}, {}
    for group in tqdm(smoother.groups, desc="search alpha", unit="group", disable=not progress):
        rows = activations.rows[group.input]
        act_max = activations.unsampled_absmax.get(group.input, activations.absmax[group.input])
        weight_max = smoother.weight_max(group)
        if alpha is None:
            weight = np.concatenate([_weight(smoother, x, COLUMNS) for x in group.linears], 1)
            alphas[group.input] = choose_alpha(rows, weight, act_max, weight_max).alpha
        else:
            alphas[group.input] = alpha
        if group.input in writers:
            weight = _weight(smoother, group.linears[0])
            delta = int8_output(rows, weight, act_max, weight_max, alphas[group.input])
            delta -= rows @ weight
            stream = (activations.rows[writers[group.input]] ** 2).sum(axis=1)
            logits[group.input] = lens.error(delta)
            residual[group.input] = float(
                ((delta**2).sum(axis=1) / np.maximum(stream, 1e-30)).mean()
            )
    logits, residual = _median_multiples(logits), _median_multiples(residual)
    sensitivity = {
        name: Sensitivity(logits[name], residual[name], max(logits[name], residual[name]))
        for name in logits
    }
    params = {g.input: g.params for g in smoother.groups}
    scores = {name: s.score for name, s in sensitivity.items()}
    return Plan(alphas, sensitivity, keep_float(scores, params, budget))
