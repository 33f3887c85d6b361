"""Other runtimes load our artifacts as they are: onnxruntime-genai (through the genai_config.json
every artifact carries) and Optimum's ORTModelForCausalLM, each in its own environment
(`make interop-env`), write the same greedy tokens as our runtime on the real model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qwen_deploy.export.genai_config import genai_config
from qwen_deploy.generation.generator import Generator
from qwen_deploy.manifest import Manifest

ROOT = Path(__file__).resolve().parents[2]
PEERS = {  # name -> (its interpreter, the script it runs)
    "onnxruntime-genai": (ROOT / ".venv-genai/bin/python", "genai_greedy.py"),
    "optimum": (ROOT / ".venv-optimum/bin/python", "optimum_greedy.py"),
}
NEW_TOKENS = 24


def test_genai_config_names_the_graph_contract(tiny_artifact):
    config = json.loads((tiny_artifact / "genai_config.json").read_text())
    manifest = Manifest.load(tiny_artifact)
    assert config == genai_config(manifest)
    decoder = config["model"]["decoder"]
    inputs = {i.name for i in manifest.inputs}
    assert decoder["inputs"]["past_key_names"] % 1 in inputs
    outputs = {o.name for o in manifest.outputs}
    assert decoder["outputs"]["present_value_names"] % 1 in outputs
    assert decoder["num_key_value_heads"] == manifest.model.num_kv_heads
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["eos_token_id"] == manifest.eos_token_ids


@pytest.mark.real
@pytest.mark.parametrize("peer", list(PEERS))
def test_peer_loads_the_artifact_and_writes_our_greedy_tokens(peer, real_artifact):
    python, script = PEERS[peer]
    if not python.exists():
        pytest.skip(f"{peer}'s environment is missing: run `make interop-env`")
    artifact = real_artifact()
    generator = Generator(artifact)
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    prompt = generator.prompt_ids(messages=messages)
    ours = generator.generate(
        prompt=prompt, temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[]
    ).token_ids
    args = [str(artifact), json.dumps(prompt), str(NEW_TOKENS)]
    run = subprocess.run(
        [str(python), str(ROOT / "tests/export/interop" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == ours
