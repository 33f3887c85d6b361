"""SmoothQuant smoothing: move activation outliers into the weights without changing the function.

For input channel j of a linear layer, s_j = max|X_j|^alpha / max|W_j|^(1-alpha); X' = X / s and
W' = diag(s) W give X' W' = X W while X' has no outlier channels. Both INT8 modes need it, because
both quantize activations: SmoothQuant statically per tensor, and the weight-only MatMulNBits
kernel dynamically per block (its fast INT8 path). Each group of layers gets its own alpha
(search.py chooses them for SmoothQuant); a group kept in floating point is left unsmoothed.
1/s goes where it costs nothing:
- q/k/v (input_layernorm), gate/up (post_attention_layernorm), lm_head (model.norm): divides the
  RMSNorm weight (layers sharing an input share s, computed over all their weights);
- down_proj: its input is silu(gate) * up, so it divides up_proj's output channels;
- o_proj: an explicit Mul by 1/s on the attention output. (Folding into v_proj would be exact
  too, but would change the cached values the graph returns as present.*.value.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .linears import Linear, find_linears, producers
from .rewrite import GraphRewrite

SCALE_RANGE = (1e-5, 1e5)  # keeps s finite for dead channels (zero activations or weights)
ROW_CHUNK = 1024


@dataclass
class Group:
    """Linear layers reading the same activation tensor: they share one smoothing vector."""

    input: str
    linears: list[Linear]
    smooth: np.ndarray | None = None  # None: the group stays in floating point
    alpha: float | None = None
    fold: str = "mul"  # norm, up_proj or mul

    @property
    def hint(self) -> str:
        first = self.linears[0]
        return first.weight.removesuffix(".weight").rsplit(".", 1)[0] + "/" + first.role

    @property
    def name(self) -> str:
        """e.g. model.layers.3.self_attn.q_proj/k_proj/v_proj, lm_head."""
        prefix = self.linears[0].weight.removesuffix(".weight").rpartition(".")[0]
        roles = "/".join(x.role for x in self.linears)
        return f"{prefix}.{roles}" if prefix else roles

    @property
    def quantized(self) -> bool:
        return self.smooth is not None

    @property
    def params(self) -> int:
        return sum(x.size for x in self.linears)


def smoothing_factors(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), 1 where a channel is dead."""
    act = act_max.astype(np.float64)
    wmax = weight_max.astype(np.float64)
    alive = (act > 0) & (wmax > 0)
    s = np.ones_like(act)
    s[alive] = act[alive] ** alpha / wmax[alive] ** (1.0 - alpha)
    return np.clip(s, *SCALE_RANGE).astype(np.float32)


def _row_absmax(weight: np.ndarray) -> np.ndarray:
    """max_n |W[k, n]| per input channel k of a [K, N] weight, read in row chunks."""
    return np.concatenate(
        [
            np.abs(np.asarray(weight[a : a + ROW_CHUNK], np.float32)).max(axis=1)
            for a in range(0, weight.shape[0], ROW_CHUNK)
        ]
    )


class Smoother:
    """Plans and folds the smoothing of every linear layer of one graph."""

    def __init__(self, rw: GraphRewrite, float_dtype: np.dtype):
        self.rw = rw
        self.dtype = np.dtype(float_dtype)
        self.linears = find_linears(rw.model.graph)
        by_input: dict[str, Group] = {}
        for lin in self.linears:
            by_input.setdefault(lin.input, Group(lin.input, [])).linears.append(lin)
        self.groups = list(by_input.values())
        self.act_max: dict[str, np.ndarray] = {}
        self._producers = producers(rw.model.graph)
        self._initializers = {t.name: t for t in rw.model.graph.initializer}
        self._column_divisors: dict[str, np.ndarray] = {}  # weight -> s of the layer it feeds
        self._weight_max: dict[str, np.ndarray] = {}

    @property
    def activations(self) -> list[str]:
        """The tensors calibration must measure: each group's input."""
        return [g.input for g in self.groups]

    def weight_max(self, group: Group) -> np.ndarray:
        """max |W[k, :]| per input channel k over all the group's weights."""
        if group.input not in self._weight_max:
            self._weight_max[group.input] = np.max(
                [_row_absmax(self.rw.source.array(x.weight)) for x in group.linears], axis=0
            )
        return self._weight_max[group.input]

    def apply(
        self,
        act_max: dict[str, np.ndarray],
        alphas: dict[str, float],
        keep_float: frozenset[str] = frozenset(),
    ) -> None:
        """Smooth every group (by input tensor) with its alpha from calibration's absmax and fold
        1/s (norm weights now); groups in `keep_float` stay as they are."""
        self.act_max = act_max
        for group in self.groups:
            if group.input not in keep_float:
                self._plan(group, alphas[group.input])

    def _group(self, tensor: str) -> Group:
        return next(g for g in self.groups if g.input == tensor)

    def _sibling(self, lin: Linear, role: str) -> Linear | None:
        return next((x for x in self.linears if x.layer == lin.layer and x.role == role), None)

    def _norm_weight(self, tensor: str) -> str | None:
        """The RMSNorm weight if `tensor` is Mul(normalized, weight[K])."""
        node = self._producers.get(tensor)
        if node is None or node.op_type != "Mul":
            return None
        weight = self._initializers.get(node.input[1])
        return weight.name if weight is not None and len(weight.dims) == 1 else None

    def _plan(self, group: Group, alpha: float) -> None:
        first = group.linears[0]
        group.alpha = alpha
        group.smooth = smoothing_factors(self.act_max[group.input], self.weight_max(group), alpha)
        up = self._sibling(first, "up_proj") if first.role == "down_proj" else None
        node = self._producers.get(group.input)
        # up_proj takes 1/s only when it is rewritten too (its group planned first, not float)
        if (
            up is not None
            and node is not None
            and up.output in node.input
            and self._group(up.input).quantized
        ):
            self._column_divisors[up.weight] = group.smooth
            group.fold = "up_proj"
        elif (norm := self._norm_weight(group.input)) is not None:
            norm_weight = np.asarray(self.rw.source.array(norm), np.float32)
            self.rw.initializer(norm, (norm_weight / group.smooth).astype(self.dtype))
            group.fold = "norm"

    def smoothed_input(self, group: Group) -> tuple[list[onnx.NodeProto], str]:
        """Nodes to put before the group's first MatMul, and the tensor its layers now read."""
        if group.fold != "mul":
            return [], group.input
        inv = self.rw.initializer(
            self.rw.name(group.hint + "/inv_smooth"), (1.0 / group.smooth).astype(self.dtype)
        )
        mul = self.rw.node("Mul", [group.input, inv], group.hint + "/Smooth")
        return [mul], mul.output[0]

    def smoothed_absmax(self, group: Group) -> float:
        """max |X'| of the smoothed activation, from the calibration statistics."""
        return float((self.act_max[group.input] / group.smooth).max())

    def weight(self, lin: Linear, group: Group) -> np.ndarray:
        """W' = diag(s) W / s_next (float32 [K, N]); rewrites the bias when columns change."""
        weight = np.array(self.rw.source.array(lin.weight), np.float32)  # the one full copy
        weight *= group.smooth[:, None]
        divisor = self._column_divisors.get(lin.weight)
        if divisor is not None:
            weight /= divisor[None, :]
            if lin.bias:
                bias = np.asarray(self.rw.source.array(lin.bias), np.float32) / divisor
                self.rw.initializer(lin.bias, bias.astype(self.dtype))
        return weight

    def summary(self) -> dict:
        folds: dict[str, int] = {}
        for group in self.groups:
            if group.quantized:
                folds[group.fold] = folds.get(group.fold, 0) + 1
        return {
            "alphas": {g.name: g.alpha for g in self.groups if g.quantized},
            "folded_into": folds,
        }
