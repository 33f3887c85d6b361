"""`qwen-deploy bench`: each engine in its own process on the same work; the report's numbers."""

from __future__ import annotations

import sys

import pytest

from qwen_deploy.bench import (
    LLAMA_CPP_BUILD,
    OPENVINO_INSTALL,
    BenchConfig,
    format_report,
    run_bench,
)


def _config(**options) -> BenchConfig:
    return BenchConfig(prompt_len=8, new_tokens=4, repeats=2, batches=(2,), **options)


def test_speculative_variants_are_compared_with_plain_decoding(tiny_artifact):
    config = _config(prompt_lookup=True, draft_tokens=(2, 4), speculative_tokens=12)
    report = run_bench(tiny_artifact, config=config, peers=())
    ours = report["engines"]["qwen-deploy"]
    assert ours["decode_tok_s"] > 0 and len(ours["runs"]["1"]) == 2
    assert set(ours["batches"]) == {"2"}
    for workload in ("code edit", "open question"):
        rows = report["speculative"][workload]
        assert list(rows) == ["plain", "prompt lookup k=2", "prompt lookup k=4"]
        assert rows["plain"]["speedup"] == 1.0 and "acceptance_rate" not in rows["plain"]
        for name in ("prompt lookup k=2", "prompt lookup k=4"):
            row = rows[name]
            assert row["identical"] and row["tokens"] == 12, row
            # the first token comes from the prefill, every other from a target forward
            assert row["target_forwards"] + row["accepted"] + 1 == 12
            assert row["speedup"] == pytest.approx(row["tok_s"] / rows["plain"]["tok_s"])
            plain_decode = rows["plain"]["decode_tok_s"]
            assert row["decode_speedup"] == pytest.approx(row["decode_tok_s"] / plain_decode)
    text = format_report(report)
    assert "speculative, code edit" in text and "prompt lookup k=4" in text


def test_llama_cpp_peer_is_skipped_with_the_reason(tiny_artifact, tmp_path, monkeypatch):
    missing = tmp_path / "none.gguf"
    report = run_bench(tiny_artifact, config=_config(), peers=(), llama_ggufs=[missing])
    assert report["engines"]["llama.cpp none"]["skipped"] == f"GGUF file {missing} not found"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    report = run_bench(tiny_artifact, config=_config(), peers=(), llama_ggufs=[gguf])
    skipped = report["engines"]["llama.cpp model"]["skipped"]
    assert skipped == LLAMA_CPP_BUILD and "-DGGML_AMX_TILE=OFF" in skipped
    assert "decode_vs_llama.cpp model" not in report["ratios"]


def test_openvino_peer_is_skipped_with_the_reason(tiny_artifact, tmp_path, monkeypatch):
    report = run_bench(tiny_artifact, config=_config(), peers=(), openvino_dirs=[tmp_path])
    skipped = report["engines"][f"openvino {tmp_path.name}"]["skipped"]
    assert (
        skipped
        == f"{tmp_path} holds no openvino_model.xml (optimum-cli export openvino writes one)"
    )
    (tmp_path / "openvino_model.xml").write_text("<net/>")
    monkeypatch.setitem(sys.modules, "openvino_genai", None)  # as if not installed
    report = run_bench(tiny_artifact, config=_config(), peers=(), openvino_dirs=[tmp_path])
    assert report["engines"][f"openvino {tmp_path.name}"]["skipped"] == OPENVINO_INSTALL
    assert not any("openvino" in ratio for ratio in report["ratios"])


def _assert_peer_measured(report: dict, peer: str) -> None:
    """`peer` ran (no skip), its numbers are real, and the ratio is ours over its own."""
    engine = report["engines"][peer]
    assert engine["skipped"] is None and engine["decode_tok_s"] > 0 and engine["ttft_s"] > 0
    assert report["ratios"][f"decode_vs_{peer}"] == pytest.approx(
        report["engines"]["qwen-deploy"]["decode_tok_s"] / engine["decode_tok_s"]
    )


@pytest.mark.real
def test_llama_cpp_runs_the_same_work_on_the_real_gguf(tiny_artifact, real_gguf):
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_BUILD)
    report = run_bench(tiny_artifact, config=_config(), peers=(), llama_ggufs=[real_gguf])
    _assert_peer_measured(report, "llama.cpp model")


@pytest.mark.real
def test_openvino_runs_the_same_work_on_its_export_of_the_real_model(tiny_artifact, real_openvino):
    pytest.importorskip("openvino_genai", reason=OPENVINO_INSTALL)
    report = run_bench(tiny_artifact, config=_config(), peers=(), openvino_dirs=[real_openvino])
    _assert_peer_measured(report, "openvino openvino-int4")


def test_peak_rss_is_the_engine_process_own():
    """A spawned child inherits its parent's ru_maxrss; the bench reports the child's own."""
    import multiprocessing

    import numpy as np

    from qwen_deploy.bench import _peak_rss_mb

    ballast = np.ones(300 << 18, np.float32)  # 300 MB in this process
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        child = pool.apply(_peak_rss_mb)
    assert ballast.sum() > 0 and _peak_rss_mb() > 300
    assert child < 200, child
