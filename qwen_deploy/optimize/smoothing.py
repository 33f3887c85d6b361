"""SmoothQuant smoothing: move activation outliers into the weights without changing the function.

For input channel j of a linear layer, s_j = max|X_j|^alpha / max|W_j|^(1-alpha); X' = X / s and
W' = diag(s) W give X' W' = X W while X' has no outlier channels. Both INT8 modes need it, because
both quantize activations: SmoothQuant statically per tensor, and the weight-only MatMulNBits
kernel dynamically per block (its fast INT8 path). 1/s goes where it costs nothing:
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
    smooth: np.ndarray | None = None
    fold: str = "mul"  # norm, up_proj or mul

    @property
    def hint(self) -> str:
        first = self.linears[0]
        return first.weight.removesuffix(".weight").rsplit(".", 1)[0] + "/" + first.role


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

    def __init__(self, rw: GraphRewrite, alpha: float, float_dtype: np.dtype):
        self.rw = rw
        self.alpha = alpha
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

    @property
    def activations(self) -> list[str]:
        """The tensors calibration must measure: each group's input."""
        return [g.input for g in self.groups]

    def apply(self, act_max: dict[str, np.ndarray]) -> None:
        """Choose s for every group from calibration's absmax and fold 1/s (norm weights now)."""
        self.act_max = act_max
        for group in self.groups:
            self._plan(group)

    def _sibling(self, lin: Linear, role: str) -> Linear | None:
        return next((x for x in self.linears if x.layer == lin.layer and x.role == role), None)

    def _norm_weight(self, tensor: str) -> str | None:
        """The RMSNorm weight if `tensor` is Mul(normalized, weight[K])."""
        node = self._producers.get(tensor)
        if node is None or node.op_type != "Mul":
            return None
        weight = self._initializers.get(node.input[1])
        return weight.name if weight is not None and len(weight.dims) == 1 else None

    def _plan(self, group: Group) -> None:
        first = group.linears[0]
        weight_max = np.max(
            [_row_absmax(self.rw.source.array(x.weight)) for x in group.linears], axis=0
        )
        group.smooth = smoothing_factors(self.act_max[group.input], weight_max, self.alpha)
        up = self._sibling(first, "up_proj") if first.role == "down_proj" else None
        node = self._producers.get(group.input)
        if up is not None and node is not None and up.output in node.input:
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
            folds[group.fold] = folds.get(group.fold, 0) + 1
        return {"alpha": self.alpha, "folded_into": folds}
