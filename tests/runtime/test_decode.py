"""runtime.decode.Batch, the one prefill/decode loop: however rows are fed, leave, join or roll
back, each row's logits equal those of the row run alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwen_deploy.quantize.quantizer import quantize_artifact
from qwen_deploy.runtime.decode import Batch
from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from qwen_deploy.runtime.padding import left_pad
from tests.forms import forms

PROMPTS = [[11, 12, 13, 14, 15, 16], [21, 22], [31, 32, 33, 34]]
ATOL = 1e-4


@pytest.fixture(scope="module", params=["onnx", "gqa"])
def backend(request, artifact) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(artifact(attention=request.param))


def alone(backend, prompt: list[int], then: list[int]) -> list[np.ndarray]:
    """Next-token logits of one row run by itself: after its prompt, then after each token."""
    batch = Batch(backend, 1)
    rows = [batch.prefill([prompt], 0)[0, -1]]
    rows += [batch.step([token])[0] for token in then]
    return rows


def test_positions_count_real_tokens_as_left_pad_does(backend):
    batch = Batch(backend, 3)
    ids, real, positions = left_pad(PROMPTS, 0)
    mask, got = batch.inputs(ids, real)
    np.testing.assert_array_equal(mask, real)
    np.testing.assert_array_equal(got, positions)
    batch.extend(ids, real)
    mask, got = batch.inputs(np.zeros((3, 1), np.int64))
    np.testing.assert_array_equal(got[:, 0], [len(p) for p in PROMPTS])
    assert mask.shape == (3, ids.shape[1] + 1)


def test_chunked_prefill_equals_one_prefill(backend):
    whole = Batch(backend, 1).prefill([PROMPTS[0]], 0)
    chunked = Batch(backend, 1).prefill([PROMPTS[0]], 0, chunk=4)
    all_rows = Batch(backend, 1).prefill([PROMPTS[0]], 0, last_only=False, chunk=4)
    assert chunked.shape == (1, 1, whole.shape[-1]) and all_rows.shape[1] == len(PROMPTS[0])
    np.testing.assert_allclose(chunked, whole, atol=ATOL)
    np.testing.assert_allclose(all_rows[:, -1:], whole, atol=ATOL)


def test_rows_leaving_and_joining_keep_each_rows_logits(backend):
    """Row 1 leaves after the prefill, rows 0 and 2 decode, then row 1 joins again from its own
    prefill: every logit row equals the row run alone (padding never leaks into a row)."""
    batch = Batch(backend, 3, capacity=32)
    first = batch.prefill(PROMPTS, 0)[:, -1]
    tokens = first.argmax(-1)
    batch.keep([0, 2])
    second = batch.step(tokens[[0, 2]])
    late = Batch(backend, 1)
    late_first = late.prefill([PROMPTS[1]], 0)[:, -1]
    batch.merge(late, capacity=32)  # rows: 0, 2, 1
    third = batch.step([*second.argmax(-1), late_first.argmax(-1)[0]])
    for row, got in ((0, [first[0], second[0], third[0]]), (2, [first[2], second[1], third[1]])):
        want = alone(backend, PROMPTS[row], [int(g.argmax()) for g in got[:-1]])
        np.testing.assert_allclose(np.stack(got), np.stack(want), atol=ATOL)
    want = alone(backend, PROMPTS[1], [int(late_first.argmax())])
    np.testing.assert_allclose(np.stack([late_first[0], third[2]]), np.stack(want), atol=ATOL)
    assert batch.rows == 3 and batch.length == batch.cache.length


def test_truncate_forgets_the_rejected_positions(backend):
    """What speculative decoding does: feed drafts, keep a prefix, go on from there."""
    batch = Batch(backend, 1, capacity=32)
    batch.prefill([PROMPTS[2]], 0)
    kept = batch.length
    batch.extend(np.array([[41, 42, 43]]))
    batch.truncate(kept + 1)  # keeps 41
    got = batch.step([44])[0]
    want = alone(backend, [*PROMPTS[2], 41], [44])[-1]
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert batch.length == kept + 2


def own_row(backend, prompt: list[int]) -> tuple[Batch, np.ndarray]:
    """A one-row batch of its own length after `prompt`, and its next-token logits [1, vocab]."""
    batch = Batch(backend, 1, capacity=32, own_lengths=True)
    return batch, batch.extend(np.array([prompt]), last_only=True)[:, -1]


def own_alone(backend, prompt: list[int], then: list[int]) -> np.ndarray:
    """A row's logits run by itself on its own bound cache: after its prompt, then each token."""
    batch, first = own_row(backend, prompt)
    return np.stack([first[0], *(batch.step([token])[0] for token in then)])


def test_rows_of_their_own_length_get_their_solo_logits_bit_for_bit(artifact):
    """The gqa form's rows keep lengths of their own: rows of other lengths joining and leaving
    change no bit of a row's logits (what batch-invariant decoding rests on)."""
    backend = OnnxRuntimeBackend(artifact(attention="gqa"))
    batch, first0 = own_row(backend, PROMPTS[0])
    other, first1 = own_row(backend, PROMPTS[1])
    batch.merge(other, capacity=32)  # lengths 6 and 2
    assert batch.mask.sum(axis=1).tolist() == [6, 2] and batch.length == 6
    second = batch.step([1, 2])
    late, first2 = own_row(backend, PROMPTS[2])
    batch.keep([0])  # the short row leaves
    batch.merge(late, capacity=32)  # lengths 7 and 4
    third = batch.step([3, 4])
    rows = [np.stack([first0[0], second[0], third[0]]), np.stack([first1[0], second[1]])]
    rows.append(np.stack([first2[0], third[1]]))
    for got, prompt, then in zip(rows, PROMPTS, ([1, 3], [2], [4]), strict=True):
        np.testing.assert_array_equal(got, own_alone(backend, prompt, then))


def test_rows_join_and_leave_an_in_place_cache_without_a_rebuild(artifact):
    """With free row slots a newcomer's positions are copied into the running cache and rows
    that leave are overwritten by those after them: the buffers stay, every row's logits are
    its solo logits bit for bit."""
    backend = OnnxRuntimeBackend(artifact(attention="gqa"))
    assert backend.capabilities.row_slots
    batch, first0 = own_row(backend, PROMPTS[0])
    batch.slots = 3
    other, first1 = own_row(backend, PROMPTS[1])
    batch.merge(other, capacity=32)  # rebuilt with room for three rows
    buffers = batch.cache.buffers
    late, first2 = own_row(backend, PROMPTS[2])
    batch.merge(late, capacity=32)  # into the free slot
    second = batch.step([1, 2, 3])
    batch.keep([0, 2])  # the middle row leaves, the last moves down
    third = batch.step([4, 5])
    assert batch.cache.buffers is buffers and batch.mask.sum(axis=1).tolist() == [8, 6]
    rows = [np.stack([first0[0], second[0], third[0]]), np.stack([first1[0], second[1]])]
    rows.append(np.stack([first2[0], second[2], third[1]]))
    for got, prompt, then in zip(rows, PROMPTS, ([1, 4], [2], [3, 5]), strict=True):
        np.testing.assert_array_equal(got, own_alone(backend, prompt, then))


def test_rows_of_their_own_length_need_a_backend_that_has_them(artifact):
    with pytest.raises(ValueError, match="left-padded"):
        Batch(OnnxRuntimeBackend(artifact(attention="onnx")), 1, own_lengths=True)


@pytest.fixture(scope="module")
def gqa_forms(artifact, tmp_path_factory):
    """gqa_forms(mode) -> a tiny gqa artifact, fp32 (None) or quantized, once per module."""
    made: dict = {}

    def make(mode: str | None) -> Path:
        if mode not in made:
            source = artifact(attention="gqa")
            made[mode] = source
            if mode is not None:
                made[mode] = tmp_path_factory.mktemp("mixed") / mode
                quantize_artifact(source, made[mode], mode, progress=False)
        return made[mode]

    return make


@pytest.mark.parametrize(
    "mode", forms([None, "int4-weight", "int8-dynamic"], [None, "int4-weight"])
)
def test_a_prefill_chunk_inside_the_decode_step_changes_no_bit(gqa_forms, mode):
    """runtime/mixed_step.py: the running rows' decode step and a newcomer's prefill chunk as one
    forward give each row's logits and cache bit for bit as their separate forwards do."""
    backend = OnnxRuntimeBackend(gqa_forms(mode))
    assert backend.capabilities.mixed_steps

    def rows() -> Batch:  # two running rows of lengths 6 and 2
        batch = Batch(backend, 1, capacity=32, own_lengths=True)
        batch.extend(np.array([PROMPTS[0]]))
        other = Batch(backend, 1, capacity=32, own_lengths=True)
        other.extend(np.array([PROMPTS[1]]))
        batch.merge(other, capacity=32)
        return batch

    def newcomer() -> Batch:  # its first chunk already cached
        batch = Batch(backend, 1, capacity=32, own_lengths=True)
        batch.extend(np.array([PROMPTS[2][:2]]))
        return batch

    chunk = np.array([PROMPTS[2][2:]])
    apart, apart_new = rows(), newcomer()
    expected = apart.step([7, 8]), apart_new.extend(chunk, last_only=True)[0, -1]
    together, together_new = rows(), newcomer()
    got = together.step_with_chunk([7, 8], together_new, chunk)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    for a, b in ((apart, together), (apart_new, together_new)):
        np.testing.assert_array_equal(a.mask, b.mask)
        for name, array in backend.cache_arrays(a.cache).items():
            np.testing.assert_array_equal(backend.cache_arrays(b.cache)[name], array)
    # the steps after it see the same caches
    np.testing.assert_array_equal(together.step([9, 10]), apart.step([9, 10]))
    np.testing.assert_array_equal(together_new.step([11]), apart_new.step([11]))


def test_artifacts_without_mixed_steps_keep_separate_forwards(artifact):
    """Left-padded forms (and the rows of a TensorRT engine) have no two-lane branch, nor do
    artifacts whose rows round differently beside others (fp16: runtime/fp32_compute.py)."""
    assert not OnnxRuntimeBackend(artifact(attention="onnx")).capabilities.mixed_steps
    fp16 = OnnxRuntimeBackend(artifact(attention="gqa", precision="fp16"))
    assert fp16.capabilities.own_row_lengths and not fp16.capabilities.mixed_steps
