"""`qwen-deploy bench` (our engine, in this process) and benchmarks/peers/compare.py (every engine
in its own Worker process) on the same work; the report's numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks._common import Worker, WorkerError
from benchmarks.peers.compare import compare
from benchmarks.peers.models import LLAMA_CPP_BUILD, OPENVINO_INSTALL, gguf_weights
from qwen_deploy.bench import BenchConfig, format_report, process_peak_rss_mb, run_bench


def _config(**options) -> BenchConfig:
    options.setdefault("bandwidth_probe_mb", 16)  # the probe's size is not under test here
    return BenchConfig(prompt_len=8, new_tokens=4, repeats=2, batches=(2,), **options)


def test_speculative_variants_are_compared_with_plain_decoding(tiny_artifact):
    config = _config(prompt_lookup=True, draft_tokens=(2, 4), speculative_tokens=12)
    report = run_bench(tiny_artifact, config=config)
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
    assert report["machine"]["int8_gemm_tops"] > 0 and "\nmachine: " in text


def test_llama_cpp_peer_is_skipped_with_the_reason(tiny_artifact, tmp_path, monkeypatch):
    missing = tmp_path / "none.gguf"
    report = compare(tiny_artifact, config=_config(), peers=(), llama_ggufs=[missing])
    assert report["engines"]["llama.cpp none"]["skipped"] == f"GGUF file {missing} not found"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    report = compare(tiny_artifact, config=_config(), peers=(), llama_ggufs=[gguf])
    skipped = report["engines"]["llama.cpp model"]["skipped"]
    assert skipped == LLAMA_CPP_BUILD and "-DGGML_AMX_TILE=OFF" in skipped
    assert "decode_vs_llama.cpp model" not in report["ratios"]


def _write_gguf(path, tensors: dict) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "qwen2")
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_weights_counts_what_a_decode_step_reads(tmp_path):
    pytest.importorskip("gguf", reason="reading GGUF headers needs the gguf extra")
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(16, 64)).astype(np.float16)
    q = quants.quantize(rng.normal(size=(64, 64)).astype(np.float32), T.Q8_0)
    head = quants.quantize(rng.normal(size=(16, 64)).astype(np.float32), T.Q5_0)
    norm = np.ones(64, np.float32)
    layer = {"blk.0.attn_q.weight": (q, T.Q8_0), "blk.0.attn_norm.weight": (norm, T.F32)}
    _write_gguf(
        tmp_path / "untied.gguf",
        {"token_embd.weight": (embedding, T.F16), **layer, "output.weight": (head, T.Q5_0)},
    )
    _write_gguf(tmp_path / "tied.gguf", {"token_embd.weight": (embedding, T.F16), **layer})
    untied, tied = gguf_weights(tmp_path / "untied.gguf"), gguf_weights(tmp_path / "tied.gguf")
    assert untied == {  # the embedding table is read a row per token: not counted
        "bytes_per_token": q.nbytes + norm.nbytes + head.nbytes,
        "types": {"Q8_0": 1, "Q5_0": 1},
    }
    assert tied == {  # ... unless it is the LM head too
        "bytes_per_token": embedding.nbytes + q.nbytes + norm.nbytes,
        "types": {"F16": 1, "Q8_0": 1},
    }
    (tmp_path / "broken.gguf").write_bytes(b"GGUF")
    assert gguf_weights(tmp_path / "broken.gguf") is None


def test_openvino_peer_is_skipped_with_the_reason(tiny_artifact, tmp_path, monkeypatch):
    report = compare(tiny_artifact, config=_config(), peers=(), openvino_dirs=[tmp_path])
    skipped = report["engines"][f"openvino {tmp_path.name}"]["skipped"]
    assert (
        skipped
        == f"{tmp_path} holds no openvino_model.xml (optimum-cli export openvino writes one)"
    )
    (tmp_path / "openvino_model.xml").write_text("<net/>")
    monkeypatch.setitem(sys.modules, "openvino_genai", None)  # as if not installed
    report = compare(tiny_artifact, config=_config(), peers=(), openvino_dirs=[tmp_path])
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
    report = compare(tiny_artifact, config=_config(), peers=(), llama_ggufs=[real_gguf])
    _assert_peer_measured(report, "llama.cpp model")
    # the real "Q4_K_M" download: 896-wide rows fall back to Q5_0, the LM head is Q8_0
    weights = report["engines"]["llama.cpp model"]["weights"]
    assert weights["types"]["Q5_0"] > weights["types"]["Q4_K"] and weights["types"]["Q8_0"] >= 1
    assert "GB of weights per token (weight matrices: " in format_report(report)


@pytest.mark.real
def test_openvino_runs_the_same_work_on_its_export_of_the_real_model(tiny_artifact, real_openvino):
    pytest.importorskip("openvino_genai", reason=OPENVINO_INSTALL)
    report = compare(tiny_artifact, config=_config(), peers=(), openvino_dirs=[real_openvino])
    _assert_peer_measured(report, "openvino openvino-int4")


def test_worker_reports_its_own_peak_rss():
    """A spawned child's ru_maxrss carries its parent's peak; the Worker reports the child's."""
    ballast = np.ones(300 << 18, np.float32)  # 300 MB in this process
    with Worker("collections:Counter", "abc", name="counter") as worker:
        assert worker.call("most_common", 1) == [("a", 1)]
        child = worker.close()
    assert ballast.sum() > 0 and process_peak_rss_mb() > 300
    assert 0 < child < 200, child


def test_worker_errors_carry_the_child_traceback_or_exit_code():
    with (
        Worker("collections:Counter", "abc", name="counter") as worker,
        pytest.raises(WorkerError) as error,
    ):
        worker.call("nope")
    message = str(error.value)
    assert message.startswith("counter failed:\nTraceback (most recent call last):")
    assert message.rstrip().endswith("AttributeError: 'Counter' object has no attribute 'nope'")
    with pytest.raises(WorkerError) as error:
        Worker("os:_exit", 3)  # the child dies while it loads
    assert str(error.value) == "os:_exit failed:\nthe process died (exit code 3)"


def test_bench_peak_rss_is_the_measurement_not_the_bandwidth_probe(tiny_artifact):
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := RSS now (earlier tests' peaks gone)
    before = process_peak_rss_mb()
    report = run_bench(tiny_artifact, config=_config(bandwidth_probe_mb=512))
    ours = report["engines"]["qwen-deploy"]
    peak = ours["batch_peak_rss_mb"]
    # the tiny engine adds tens of MB; the probe's 512 MiB matrix, allocated after, is not in it
    assert before <= peak < before + 256, (before, peak, process_peak_rss_mb())
    # the single-request peak was read before the batches ran
    assert before <= ours["peak_rss_mb"] <= peak and set(ours["batches"]) == {"2"}
    assert process_peak_rss_mb() > before + 400  # ... though it did raise this process's peak after
