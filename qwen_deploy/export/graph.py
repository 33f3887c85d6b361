"""The Qwen2 decoder with KV cache as an ONNX graph, built node by node from the weights.

One graph serves prefill and decode. The attention form is chosen per runtime:
- "onnx": standard ONNX Attention (opset 23) on 4D Q/K/V with the KV concat outside the node, an
  explicit boolean mask and elementwise RoPE; TensorRT >= 10.14 imports it as fused IAttention.
- "gqa": com.microsoft GroupQueryAttention, onnxruntime's fastest kernel.
- "decomposed": MatMul/Softmax/MatMul, runs anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..checkpoint.huggingface import ModelSpec
from ..contract import (
    ATTENTION_MASK,
    BATCH,
    INPUT_IDS,
    KV_PARTS,
    LOGITS,
    LOGITS_TO_KEEP,
    MS_DOMAIN,
    PAST,
    POSITION_IDS,
    TOTAL,
    declare_oldest_ir,
    past_name,
    present_name,
)
from ..contract import LOGITS_LENGTH as LOGITS_LEN
from ..contract import SEQUENCE as SEQ

OPSET = 23

WeightSource = Callable[[str, str, bool], TensorProto]
"""(onnx initializer name, checkpoint tensor name, transpose) -> external-data TensorProto."""


def rope_cache(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_positions, head_dim/2], float32 arithmetic as transformers uses."""
    positions = np.arange(spec.max_position_embeddings, dtype=np.float32)[:, None]
    freqs = (positions * spec.inv_freq()[None, :]).astype(np.float32)
    return np.cos(freqs), np.sin(freqs)


class GraphBuilder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(
        self,
        op_type: str,
        inputs: list[str],
        hint: str = "",
        outputs: int | list[str] = 1,
        domain: str = "",
        **attrs,
    ) -> str | list[str]:
        names = (
            outputs
            if isinstance(outputs, list)
            else [self._name(f"{hint or op_type}/out{i}") for i in range(outputs)]
        )
        self.nodes.append(
            helper.make_node(
                op_type, inputs, names, name=self._name(hint or op_type), domain=domain, **attrs
            )
        )
        return names[0] if len(names) == 1 else names

    def const(self, value, hint: str = "const", dtype=None) -> str:
        name = self._name(hint)
        array = np.asarray(value, dtype=dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def add_initializer(self, tensor: TensorProto) -> str:
        self.initializers.append(tensor)
        return tensor.name


def _value_info(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def graph_io(spec: ModelSpec, dtype: np.dtype) -> tuple[list, list]:
    """Required inputs and outputs of the decoder graph: (name, onnx elem type, shape) triples.

    The optional `logits_to_keep` input (an overridable initializer) is not among them.
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    kv, d = spec.num_kv_heads, spec.head_dim
    inputs = [
        (INPUT_IDS, TensorProto.INT64, [BATCH, SEQ]),
        (ATTENTION_MASK, TensorProto.INT64, [BATCH, TOTAL]),
        (POSITION_IDS, TensorProto.INT64, [BATCH, SEQ]),
    ]
    outputs = [(LOGITS, elem, [BATCH, LOGITS_LEN, spec.vocab_size])]
    for i in range(spec.num_layers):
        for part in KV_PARTS:
            inputs.append((past_name(i, part), elem, [BATCH, kv, PAST, d]))
            outputs.append((present_name(i, part), elem, [BATCH, kv, TOTAL, d]))
    return inputs, outputs


class DecoderGraph:
    """Builds the whole decoder; `weight(onnx_name, ckpt_name, transpose)` streams one tensor."""

    def __init__(
        self,
        spec: ModelSpec,
        dtype: np.dtype,
        attention: str,
        weight: WeightSource,
    ):
        self.spec = spec
        self.g = GraphBuilder(dtype)
        self.attention = attention
        self.weight = weight

    # -- small pieces -------------------------------------------------------------------------
    def _w(self, ckpt_name: str, transpose: bool = False) -> str:
        return self.g.add_initializer(self.weight(ckpt_name, ckpt_name, transpose))

    def _linear(self, x: str, prefix: str, bias: bool = False) -> str:
        y = self.g.op(
            "MatMul", [x, self._w(prefix + ".weight", transpose=True)], prefix + "/MatMul"
        )
        if bias:
            y = self.g.op("Add", [y, self._w(prefix + ".bias")], prefix + "/Add")
        return y

    def _rms_norm(self, x: str, weight_name: str) -> str:
        """Qwen2RMSNorm: normalize in float32, cast back, then scale (transformers' order)."""
        g, hint = self.g, weight_name.removesuffix(".weight")
        xf = (
            x
            if g.dtype == np.float32
            else g.op("Cast", [x], hint + "/CastUp", to=TensorProto.FLOAT)
        )
        # Pow (not Mul): the pattern onnxruntime fuses into SimplifiedLayerNormalization
        sq = g.op("Pow", [xf, g.const(np.float32(2.0), "two")], hint + "/Square")
        mean = g.op("ReduceMean", [sq, g.const([-1], "axes", np.int64)], hint + "/Mean", keepdims=1)
        eps = g.const(np.float32(self.spec.rms_norm_eps), "eps")
        rms = g.op("Sqrt", [g.op("Add", [mean, eps], hint + "/AddEps")], hint + "/Sqrt")
        normed = g.op("Div", [xf, rms], hint + "/Div")
        if g.dtype != np.float32:
            normed = g.op("Cast", [normed], hint + "/CastDown", to=g.elem)
        return g.op("Mul", [normed, self._w(weight_name)], hint + "/Scale")

    def _heads(self, x: str, heads: int, hint: str) -> str:
        """[B, S, heads*D] -> [B, heads, S, D]."""
        shape = self.g.const([0, 0, heads, self.spec.head_dim], "shape", np.int64)
        y = self.g.op("Reshape", [x, shape], hint + "/Reshape")
        return self.g.op("Transpose", [y], hint + "/Transpose", perm=[0, 2, 1, 3])

    def _merge_heads(self, x: str, hint: str) -> str:
        """[B, H, S, D] -> [B, S, H*D]."""
        y = self.g.op("Transpose", [x], hint + "/Transpose", perm=[0, 2, 1, 3])
        shape = self.g.const([0, 0, self.spec.num_heads * self.spec.head_dim], "shape", np.int64)
        return self.g.op("Reshape", [y, shape], hint + "/Reshape")

    # -- shared per-graph tensors --------------------------------------------------------------
    def _mask(self) -> tuple[str, str, str]:
        """Boolean [B,1,S,T] 'may attend': causal AND not padding, OR the diagonal.

        Allowing the diagonal keeps fully padded query rows (left padding) finite: their outputs
        are ignored, but NaN there would leak into valid rows through 0 * NaN in the next layer.
        Returns (bool mask, padding-only bool mask [B,1,S,T] without the causal part, the total
        sequence length T as an int64 scalar).
        """
        g = self.g
        one = g.const(1, "one", np.int64)
        total = g.op("Gather", [g.op("Shape", [ATTENTION_MASK], "mask/ShapeT"), one], "mask/T")
        seq = g.op("Gather", [g.op("Shape", [INPUT_IDS], "mask/ShapeS"), one], "mask/S")
        past = g.op("Sub", [total, seq], "mask/Past")
        q_pos = g.op("Range", [past, total, one], "mask/QPos")
        k_pos = g.op("Range", [g.const(0, "zero", np.int64), total, one], "mask/KPos")
        q_col = g.op("Unsqueeze", [q_pos, g.const([1], "axes", np.int64)], "mask/QCol")
        k_row = g.op("Unsqueeze", [k_pos, g.const([0], "axes", np.int64)], "mask/KRow")
        causal = g.op("LessOrEqual", [k_row, q_col], "mask/Causal")
        diag = g.op("Equal", [k_row, q_col], "mask/Diag")
        pad = g.op("Cast", [ATTENTION_MASK], "mask/PadBool", to=TensorProto.BOOL)
        pad = g.op("Unsqueeze", [pad, g.const([1, 2], "axes", np.int64)], "mask/Pad4D")
        allowed = g.op("Or", [g.op("And", [causal, pad], "mask/And"), diag], "mask/Allowed")
        pad_only = g.op("Or", [pad, diag], "mask/PadOrDiag")
        return allowed, pad_only, total

    def _additive(self, allowed: str, hint: str) -> str:
        """Boolean mask -> additive float mask (0 or the dtype's most negative finite value)."""
        g = self.g
        neg = g.const(np.finfo(g.dtype).min, "neg", g.dtype)
        return g.op("Where", [allowed, g.const(0, "zero", g.dtype), neg], hint)

    def _rope_tables(self) -> tuple[str, str]:
        cos, sin = rope_cache(self.spec)
        return (
            self.g.const(cos, "rope/cos_cache", self.g.dtype),
            self.g.const(sin, "rope/sin_cache", self.g.dtype),
        )

    def _rope_gathered(self, cos_cache: str, sin_cache: str) -> tuple[str, str]:
        """cos/sin [B,1,S,D] for the decomposed form (rotate_half convention)."""
        g = self.g
        out = []
        for table, hint in ((cos_cache, "rope/cos"), (sin_cache, "rope/sin")):
            half = g.op("Gather", [table, POSITION_IDS], hint + "/Gather")
            full = g.op("Concat", [half, half], hint + "/Concat", axis=-1)
            out.append(g.op("Unsqueeze", [full, g.const([1], "axes", np.int64)], hint + "/4D"))
        return out[0], out[1]

    def _rotate(self, x: str, cos: str, sin: str, hint: str) -> str:
        """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1)."""
        g = self.g
        half = self.spec.head_dim // 2
        x1, x2 = g.op(
            "Split",
            [x, g.const([half, half], "split", np.int64)],
            hint + "/Split",
            outputs=2,
            axis=-1,
        )
        rotated = g.op("Concat", [g.op("Neg", [x2], hint + "/Neg"), x1], hint + "/Concat", axis=-1)
        return g.op(
            "Add",
            [
                g.op("Mul", [x, cos], hint + "/MulCos"),
                g.op("Mul", [rotated, sin], hint + "/MulSin"),
            ],
            hint + "/Add",
        )

    # -- attention forms -----------------------------------------------------------------------
    def _attention(self, i: int, q: str, k: str, v: str, ctx: dict) -> str:
        """Returns attention output [B, S, H*D] and writes present.{i}.key/value."""
        g, s = self.g, self.spec
        p = f"model.layers.{i}.self_attn"
        past_k, past_v = (past_name(i, part) for part in KV_PARTS)
        present_k, present_v = (present_name(i, part) for part in KV_PARTS)
        if self.attention == "gqa":
            q = g.op(
                "RotaryEmbedding",
                [q, ctx["cos"], ctx["sin"], POSITION_IDS],
                p + "/RopeQ",
                num_heads=s.num_heads,
            )
            k = g.op(
                "RotaryEmbedding",
                [k, ctx["cos"], ctx["sin"], POSITION_IDS],
                p + "/RopeK",
                num_heads=s.num_kv_heads,
            )
            out = g.op(
                "GroupQueryAttention",
                [
                    q,
                    k,
                    v,
                    past_k,
                    past_v,
                    ctx["seqlens_k"],
                    ctx["total_len"],
                    "",
                    "",
                    "",
                    ctx["bias"],
                ],
                p + "/GQA",
                outputs=[p + "/GQA/out", present_k, present_v],
                domain=MS_DOMAIN,
                num_heads=s.num_heads,
                kv_num_heads=s.num_kv_heads,
            )
            return out[0]
        q4 = self._heads(q, s.num_heads, p + "/q")
        k4 = self._heads(k, s.num_kv_heads, p + "/k")
        v4 = self._heads(v, s.num_kv_heads, p + "/v")
        # RoPE as elementwise ops: TensorRT's parser imports RotaryEmbedding only from 10.15,
        # Attention from 10.14, and fuses the elementwise form itself
        q4 = self._rotate(q4, ctx["cos"], ctx["sin"], p + "/RopeQ")
        k4 = self._rotate(k4, ctx["cos"], ctx["sin"], p + "/RopeK")
        g.op("Concat", [past_k, k4], p + "/ConcatK", outputs=[present_k], axis=2)
        g.op("Concat", [past_v, v4], p + "/ConcatV", outputs=[present_v], axis=2)
        if self.attention == "onnx":
            y = g.op("Attention", [q4, present_k, present_v, ctx["mask"]], p + "/Attention")
        else:
            y = self._decomposed_attention(q4, present_k, present_v, ctx["mask_add"], p)
        return self._merge_heads(y, p + "/merge")

    def _repeat_kv(self, x: str, hint: str) -> str:
        """[B, KV, T, D] -> [B, H, T, D] by repeating each KV head H/KV times (GQA)."""
        g, s = self.g, self.spec
        groups = s.num_heads // s.num_kv_heads
        if groups == 1:
            return x
        x5 = g.op("Unsqueeze", [x, g.const([2], "axes", np.int64)], hint + "/Unsqueeze")
        shape5 = g.op("Shape", [x5], hint + "/Shape")
        ones = g.const([1, 1, groups, 1, 1], "expand", np.int64)
        expanded = g.op(
            "Expand", [x5, g.op("Mul", [shape5, ones], hint + "/ExpandShape")], hint + "/Expand"
        )
        shape4 = g.const([0, s.num_heads, -1, s.head_dim], "shape", np.int64)
        return g.op("Reshape", [expanded, shape4], hint + "/Reshape")

    def _decomposed_attention(self, q: str, k: str, v: str, mask_add: str, p: str) -> str:
        g = self.g
        k = self._repeat_kv(k, p + "/repeat_k")
        v = self._repeat_kv(v, p + "/repeat_v")
        kt = g.op("Transpose", [k], p + "/KT", perm=[0, 1, 3, 2])
        scores = g.op("MatMul", [q, kt], p + "/QK")
        scale = g.const(1.0 / np.sqrt(self.spec.head_dim), "scale", g.dtype)
        scores = g.op("Add", [g.op("Mul", [scores, scale], p + "/Scale"), mask_add], p + "/Mask")
        if g.dtype != np.float32:  # softmax in float32, as transformers' eager attention does
            scores = g.op("Cast", [scores], p + "/CastUp", to=TensorProto.FLOAT)
        probs = g.op("Softmax", [scores], p + "/Softmax", axis=-1)
        if g.dtype != np.float32:
            probs = g.op("Cast", [probs], p + "/CastDown", to=g.elem)
        return g.op("MatMul", [probs, v], p + "/PV")

    def _gqa_inputs(self, pad_only: str, total: str) -> dict:
        """seqlens_k: each row's last attended position (its mask's last 1). Left-padded rows all
        end at the last column; a right-padded row ends at its own length, so GroupQueryAttention
        writes its new tokens there and attends over its own positions only: rows of one batch
        keep lengths of their own."""
        g = self.g
        k_pos = g.op(
            "Range", [g.const(0, "zero", np.int64), total, g.const(1, "one", np.int64)], "gqa/KPos"
        )
        ends = g.op("Mul", [ATTENTION_MASK, k_pos], "gqa/MaskedPos")
        last = g.op("ReduceMax", [ends, g.const([1], "axes", np.int64)], "gqa/LastPos", keepdims=0)
        return {
            "seqlens_k": g.op("Cast", [last], "gqa/SeqlensK", to=TensorProto.INT32),
            "total_len": g.op("Cast", [total], "gqa/Total32", to=TensorProto.INT32),
            "bias": self._additive(pad_only, "gqa/Bias"),
        }

    def _keep_last(self, x: str) -> str:
        """x[:, -logits_to_keep:] (all positions for 0): a prefill computes the LM head only where
        the caller reads logits. `logits_to_keep` is a graph input with a default initializer, so
        callers that never feed it (and TensorRT, which imports it as a constant) get every
        position."""
        g = self.g
        g.add_initializer(numpy_helper.from_array(np.array(0, np.int64), LOGITS_TO_KEEP))
        start = g.op(
            "Unsqueeze",
            [g.op("Neg", [LOGITS_TO_KEEP], "keep/Neg"), g.const([0], "axes", np.int64)],
            "keep/Start",
        )
        end = g.const([np.iinfo(np.int64).max], "end", np.int64)
        return g.op("Slice", [x, start, end, g.const([1], "axes", np.int64)], "keep/Slice")

    # -- the whole decoder ---------------------------------------------------------------------
    def build(self, progress: Callable[[str], None] = lambda _: None) -> onnx.ModelProto:
        g, s = self.g, self.spec
        allowed, pad_only, total = self._mask()
        cos_cache, sin_cache = self._rope_tables()
        ctx: dict = {"cos": cos_cache, "sin": sin_cache}
        if self.attention == "gqa":
            ctx.update(self._gqa_inputs(pad_only, total))
        else:
            ctx["cos"], ctx["sin"] = self._rope_gathered(cos_cache, sin_cache)
            if self.attention == "onnx":
                ctx["mask"] = allowed
            else:
                ctx["mask_add"] = self._additive(allowed, "mask/Additive")

        progress("model.embed_tokens.weight")
        x = g.op("Gather", [self._w("model.embed_tokens.weight"), INPUT_IDS], "embed")
        for i in range(s.num_layers):
            p = f"model.layers.{i}"
            progress(p)
            h = self._rms_norm(x, p + ".input_layernorm.weight")
            q = self._linear(h, p + ".self_attn.q_proj", bias=True)
            k = self._linear(h, p + ".self_attn.k_proj", bias=True)
            v = self._linear(h, p + ".self_attn.v_proj", bias=True)
            attn = self._attention(i, q, k, v, ctx)
            x = g.op("Add", [x, self._linear(attn, p + ".self_attn.o_proj")], p + "/Residual1")
            h = self._rms_norm(x, p + ".post_attention_layernorm.weight")
            gate = self._linear(h, p + ".mlp.gate_proj")
            up = self._linear(h, p + ".mlp.up_proj")
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], p + "/mlp/Sigmoid")], p + "/mlp/SiLU")
            down = self._linear(g.op("Mul", [act, up], p + "/mlp/Mul"), p + ".mlp.down_proj")
            x = g.op("Add", [x, down], p + "/Residual2")
        progress("lm_head")
        h = self._rms_norm(self._keep_last(x), "model.norm.weight")
        weight = self.weight("lm_head.weight", s.lm_head_name, True)
        g.op("MatMul", [h, g.add_initializer(weight)], "lm_head/MatMul", outputs=[LOGITS])

        inputs, outputs = graph_io(s, g.dtype)
        graph = helper.make_graph(
            g.nodes,
            "qwen2_decoder",
            [_value_info(*t) for t in inputs]
            + [_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [])],
            [_value_info(*t) for t in outputs],
            initializer=g.initializers,
        )
        opsets = [helper.make_opsetid("", OPSET)]
        if self.attention == "gqa":
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qwen-deploy")
        declare_oldest_ir(model)
        return model
