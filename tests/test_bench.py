"""benchmarks/bench.py: a quick run of a cheap training benchmark, the loader and the embedding reader writes the
peer script's JSON form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
PEER_PRIOR_PARAMS = 24_918_544  # DALLE2-pytorch's DiffusionPrior in ../shared/bench/peer_dalle2.py
PEER_DECODER_PARAMS = 16.3e6  # its Unet (dim 64, mults 1, 2, 4), as bench.py's DECODER_MATCHED says
ROW_FIELDS = ("name", "batch", "samples_per_s", "params", "gflop_per_iter", "achieved_gflops", "ms_per_iter_median")


def _run(script: Path, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """A benchmark script as a user runs it, output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_quick_bench_writes_peer_json_form(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--quick", "--only", "prior_train,decoder32_train,loader,embedding_reader", "--json", str(out)]
    done = _run(BENCH, args, tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "prior_train" in done.stdout and "samples/s" in done.stdout  # the table

    data = json.loads(out.read_text())
    assert data["meta"]["device"]["type"] in ("cpu", "cuda")
    rows = {row["name"]: row for row in data["results"]}
    for name in ("prior_train", "decoder32_train", "loader", "loader_stock_webdataset", "embedding_reader"):
        assert set(ROW_FIELDS) <= set(rows[name]), name
        assert rows[name]["samples_per_s"] > 0

    prior = rows["prior_train"]
    assert abs(prior["params"] / PEER_PRIOR_PARAMS - 1) <= 0.10  # matched size: within 10% of the peer's
    assert prior["gflop_per_iter"] > 0 and prior["achieved_gflops"] > 0
    assert prior["saved_for_backward_mib"] > 0 and prior["gradient_checkpointing"] is False
    assert prior["fraction_of_fp32_mm_ceiling"] > 0
    # The decoder matched to the peer's UNet (16.3 M parameters), reading no text as the peer's does.
    assert abs(rows["decoder32_train"]["params"] / PEER_DECODER_PARAMS - 1) <= 0.05

    # Our own matmul ceiling is measured in the same run.
    assert any(name.startswith("mm_") and "float32" in name and rows[name]["achieved_gflops"] > 0 for name in rows)
    assert rows["loader"]["ratio_to_stock"] > 0
    assert rows["embedding_reader"]["rows_per_s_per_core"] > 0 and rows["embedding_reader"]["embedding_dim"] == 768
    assert rows["embedding_reader_captions"]["rows_per_s_per_core"] > 0
    assert {r["name"] for r in data["ratios"]} >= {"loader"}
