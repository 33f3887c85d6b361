"""Speculative decoding on the real model: a code edit (the prompt holds the code to change),
greedy, gives exactly plain decoding's tokens with either drafter, in fewer target forwards."""

from __future__ import annotations

import pytest

from qwen_deploy.bench import EDITED_CODE
from qwen_deploy.generation.generator import Generator
from qwen_deploy.generation.speculative import DraftModel, PromptLookup
from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

pytestmark = pytest.mark.real
EDIT = [
    {
        "role": "user",
        "content": "Rename the function moving_average to rolling_mean in this code. Reply "
        "with the full code only.\n\n" + EDITED_CODE,
    }
]


def test_code_edit_drafts_keep_the_greedy_output(real_artifact):
    generator = Generator(real_artifact(attention="gqa"))
    plain = generator.generate(messages=EDIT, temperature=0, max_tokens=96)
    lookup = generator.generate(messages=EDIT, temperature=0, max_tokens=96, drafter=PromptLookup())
    assert lookup.token_ids == plain.token_ids
    assert "def rolling_mean(values, window):" in plain.content
    assert lookup.speculative["tokens_per_forward"] > 2.5, lookup.speculative
    # a draft artifact: the fp16 export (rounding differs, so some drafts are refused)
    draft = DraftModel(OnnxRuntimeBackend(real_artifact(precision="fp16")), 151936)
    drafted = generator.generate(
        messages=EDIT, temperature=0, max_tokens=48, drafter=draft, draft_tokens=4
    )
    assert drafted.token_ids == plain.token_ids[:48]
    assert drafted.speculative["acceptance_rate"] > 0.8, drafted.speculative
