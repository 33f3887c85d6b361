"""The peers' runners: each loads its engine on the same model, warms it up, and answers
`single()` with one greedy run of exactly `new_tokens` tokens from qwen_deploy.bench's prompt,
timed as ours (`timings`). A benchmarks._common.Worker builds each in its own process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from qwen_deploy.bench import BenchConfig, prompts, timings


class TransformersRunner:
    """transformers eager `generate` on the source checkpoint, in float32."""

    def __init__(self, checkpoint: str, config: BenchConfig):
        import torch

        from qwen_deploy.parity.reference import TorchReference

        if config.threads:
            torch.set_num_threads(config.threads)
        self.torch = torch
        self.model = TorchReference(checkpoint).model  # float32, eager attention
        self.ids = torch.tensor(prompts(config, self.model.config.vocab_size)[:1])
        self.new_tokens = config.new_tokens
        self._timed(2)

    def _timed(self, new_tokens: int) -> dict:
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Stamps(BaseStreamer):
            def put(self, value):  # the first put is the prompt itself
                stamps.append(time.perf_counter())

            def end(self):
                pass

        start = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(
                self.ids,
                attention_mask=self.torch.ones_like(self.ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                streamer=Stamps(),
                pad_token_id=0,
            )
        return timings(start, stamps[1:])

    def single(self) -> dict:
        return self._timed(self.new_tokens)


class GenaiRunner:
    """onnxruntime-genai on its own fp32 CPU export (models.genai_model)."""

    def __init__(self, model_dir: str, config: BenchConfig):
        import onnxruntime_genai as og

        og_config = og.Config(model_dir)
        if config.threads:
            options = {"intra_op_num_threads": config.threads}
            og_config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.og = og
        self.model = og.Model(og_config)
        genai_config = json.loads((Path(model_dir) / "genai_config.json").read_text())
        self.ids = prompts(config, genai_config["model"]["vocab_size"])[0]
        self.new_tokens = config.new_tokens
        self._timed(2)

    def _timed(self, new_tokens: int) -> dict:
        params = self.og.GeneratorParams(self.model)
        total = len(self.ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        start = time.perf_counter()
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(self.ids)
        stamps = []
        while not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
        return timings(start, stamps)

    def single(self) -> dict:
        return self._timed(self.new_tokens)


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on a GGUF file, on every core by default."""

    def __init__(self, gguf: str, config: BenchConfig):
        from llama_cpp import Llama

        threads = config.threads or os.cpu_count()  # llama.cpp's default is half the cores
        self.llm = Llama(
            model_path=gguf,
            n_ctx=config.prompt_len + config.new_tokens + 16,
            n_batch=max(config.prompt_len, 32),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.ids = prompts(config, self.llm.n_vocab())[0]
        self.new_tokens = config.new_tokens
        self._timed(2)

    def _timed(self, new_tokens: int) -> dict:
        self.llm.reset()  # no prefix reuse from the previous run
        stamps = []
        start = time.perf_counter()
        for _ in self.llm.generate(self.ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:  # exactly new_tokens, end of text or not
                break
        return timings(start, stamps)

    def single(self) -> dict:
        return self._timed(self.new_tokens)


class OpenVinoRunner:
    """openvino-genai's LLMPipeline on CPU with the f32 precision hint: it decodes faster here than
    the default bf16 (AMX) hint, which speeds up prefill instead."""

    def __init__(self, model_dir: str, config: BenchConfig):
        import openvino as ov
        import openvino_genai as og

        self.og, self.ov = og, ov
        self.pipe = og.LLMPipeline(
            model_dir,
            "CPU",
            INFERENCE_NUM_THREADS=config.threads or os.cpu_count(),
            INFERENCE_PRECISION_HINT="f32",
        )
        self.vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        self.ids = np.array(prompts(config, self.vocab)[:1], np.int64)
        self.new_tokens = config.new_tokens
        self._timed(2)

    def _timed(self, new_tokens: int) -> dict:
        # the pipeline keeps the last run's KV cache and reuses a shared prefix: a changed first
        # token makes every run prefill the whole prompt, as the other engines do
        self.ids[0, 0] = (self.ids[0, 0] + 1) % self.vocab
        config = self.og.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = new_tokens
        config.do_sample, config.ignore_eos = False, True
        stamps: list[float] = []
        og = self.og

        class Stamps(og.StreamerBase):
            def write(self, token):
                stamps.append(time.perf_counter())
                return og.StreamingStatus.RUNNING

            def end(self):
                pass

        inputs = og.TokenizedInputs(
            self.ov.Tensor(self.ids), self.ov.Tensor(np.ones_like(self.ids))
        )
        start = time.perf_counter()
        self.pipe.generate(inputs, config, Stamps())
        return timings(start, stamps)

    def single(self) -> dict:
        return self._timed(self.new_tokens)
