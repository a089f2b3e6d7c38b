"""The layer-score diagnostic end to end on the tiny model: every score, both truths, sets, λ table, files."""

from __future__ import annotations

import json

import pytest

from gradmap.diagnose import SCORES, main


def test_diagnose_writes_table_json_and_figure(tmp_path):
    main(
        [
            "model=tiny_llama",
            "calib.n_samples=2",
            "calib.seq_len=32",
            "calib.dev.n_samples=2",
            "calib.dev.seq_len=32",
            "prune.ratio=0.25",
            f"diagnose.out={tmp_path}",
            "diagnose.heldout_windows=2",
            "diagnose.heldout_len=32",
        ]
    )
    out = tmp_path / "tiny_llama"
    res = json.loads((out / "diagnose.json").read_text())
    assert set(res["scores"]) == set(SCORES) and res["n_remove"] == 2
    for row in res["scores"].values():
        assert -1.0 <= row["vs_dev"]["rho"] <= 1.0 and 0 <= row["vs_calib"]["overlap"] <= 2
    assert {int(k) for k in res["truth"]["dev"]} == set(range(8))  # JSON keys are strings
    ppl = res["sets"]["PPL (0/0)"]["removed"]
    truth = res["truth"]["calib"]
    assert max(truth[str(i)] for i in ppl) <= min(v for k, v in truth.items() if int(k) not in ppl)
    for row in res["stage2"].values():
        assert row["dev"]["none"] == pytest.approx(row["dev"]["none"]) and "mean_rank1" in row["heldout"]
    assert (out / "diagnose.png").stat().st_size > 1000
    assert "| layer_gate_tok" in (out / "diagnose.md").read_text()
