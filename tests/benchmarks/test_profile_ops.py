"""benchmarks/profile_ops.py: the per-op profile splits a chunked prefill from its decode steps."""

from __future__ import annotations

from benchmarks.profile_ops import profile
from qwen_deploy.generation.engine import PREFILL_CHUNK_ALONE


def test_profile_sums_each_phase_per_op(artifact, tmp_path):
    report = profile(artifact(attention="gqa"), PREFILL_CHUNK_ALONE + 8, 3, 1, str(tmp_path))
    prefill, decode = report["prefill"], report["decode"]
    assert prefill["runs"] == 2 and decode["runs"] == 3  # a full chunk, then the 8-token rest
    for phase in (prefill, decode):
        assert "GroupQueryAttention" in phase["ops"] and "MatMul" in phase["ops"]
        # node times fall inside their runs, which also spend time between nodes
        assert 0 < sum(phase["ops"].values()) <= phase["seconds"]
    assert list(prefill["ops"].values()) == sorted(prefill["ops"].values(), reverse=True)


def test_a_batch_profiles_the_same_runs_with_more_rows(artifact, tmp_path):
    report = profile(artifact(attention="gqa"), 12, 3, 1, str(tmp_path), batch=3)
    assert report["prefill"]["runs"] == 1 and report["decode"]["runs"] == 3
    assert "GroupQueryAttention" in report["decode"]["ops"]
