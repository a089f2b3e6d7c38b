"""The report on a synthetic runs folder: numbers computed by hand, files present and non-empty.

The records below are written by the test in the result.json layout of gradmap.pipeline.record, so the report is
checked against numbers we know, not against another run of the same code.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradmap.eval.items import ITEMS_FILE, read_items, write_items
from gradmap.report import (
    DEFAULT_AVERAGING,
    PLOTS,
    Averaging,
    build,
    main,
    pareto_front,
    parse_averaging,
    tables,
)
from gradmap.report.latex import short_caption, standalone
from gradmap.report.paired import NO_ITEMS
from gradmap.report.stability import jaccard, stability_table
from gradmap.report.stats import (
    independent_noise,
    paired_bootstrap,
    ppl_paired_bootstrap,
    ratio_bootstrap,
    stratified_paired_bootstrap,
)

MODEL, EVAL, L = "toy", "quick", 8
SPEED = {
    "prompt_len": 16,
    "gen_len": 4,
    "batch_size": 1,
    "repeats": 1,
    "device": "cpu",
    "dtype": "float32",
    "threads": 2,
}


def record(
    method: str,
    n_remove: int,
    boolq: float,
    piqa: float,
    ppl: float,
    select_s: float,
    repair_s: float,
    prefill: float = 100.0,
    repair_name: str | None = None,
    removed: list[int] | None = None,
    **extra,
) -> dict:
    """A result.json as the pipeline writes it (only the keys the report reads, plus a few)."""
    name = f"{MODEL}-{method}-{'dense' if method == 'none' else f'n{n_remove}'}"
    rec = {
        "status": "ok",
        "job_id": f"id{abs(hash(name)) % 10**6}",
        "job_name": name,
        "sweep": "synthetic",
        "model": MODEL,
        "method": method,
        "repair": repair_name or "none",
        "n_layers": L,
        "n_remove": n_remove,
        "ratio": n_remove / L,
        "removed_layers": removed if removed is not None else list(range(L - n_remove, L)),
        "params_before": 1000,
        "params_after": 1000 - 100 * n_remove,
        "timing": {
            "select_s": select_s,
            "repair_s": repair_s,
            "prune_s": select_s + repair_s,
            "peak_mem_bytes": 2**30,
            "peak_mem_kind": "process_peak_rss",
            "device": "cpu (x86_64, 2 threads)",
        },
        "metrics": {
            "boolq": boolq,
            "boolq/acc": boolq,
            "boolq/acc_norm": None,
            "boolq/acc_stderr": 0.01,
            "boolq/n": 1000,
            "piqa": piqa,
            "piqa/acc": piqa,
            "piqa/acc_norm": piqa - 0.01,
            "piqa/acc_stderr": 0.01,
            "piqa/n": 1000,
            "avg": 50 * (boolq + piqa),
            "wikitext2_ppl": ppl,
            "ppl_window": 128,
            "eval_preset": EVAL,
        },
        "speed": {**SPEED, "prefill_tok_s": prefill, "decode_tok_s": prefill / 10, "latency_s": 1.0},
        "config": {"repair": {"name": repair_name}, "eval": {"name": EVAL}},
        "finished_at": "2026-01-01T00:00:00+00:00",
    }
    rec.update(extra)
    return rec


def write(root: Path, rec: dict) -> None:
    folder = root / f"{rec['job_name']}-{rec['job_id']}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(rec))
    (folder / "job.log").write_text("")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs") / "synthetic"
    shifts = {str(i): 0.1 * i for i in range(L - 2)}
    recs = [
        record("none", 0, 0.80, 0.70, 10.0, 0.0, 0.0, prefill=100.0, removed=[]),
        # 25% (2 of 8): GradMAP 10 s; speedups 0.1, 0.3, 6, 4 -> mean 2.6, geo-mean 0.72 ** 0.25
        record(
            "gradmap",
            2,
            0.70,
            0.60,
            15.0,
            8.0,
            2.0,
            prefill=150.0,
            repair_name=None,
            removed=[5, 6],
            scores=[{str(i): float(i + 1) for i in range(L)}],
            repair_info={"site": 3, "shifts": shifts},
        ),
        record("shortgpt", 2, 0.60, 0.60, 20.0, 1.0, 0.0),
        record("taylor_plus", 2, 0.75, 0.65, 12.0, 3.0, 0.0),
        record("sleb", 2, 0.70, 0.60, 14.0, 60.0, 0.0),
        record("streamline", 2, 0.70, 0.62, 16.0, 30.0, 10.0),
        record("random", 2, 0.50, 0.50, 90.0, 0.01, 0.0),
        # 50% (4 of 8): every method 50 s vs GradMAP 10 s -> mean 5.0 = geo-mean
        record(
            "gradmap",
            4,
            0.60,
            0.55,
            30.0,
            8.0,
            2.0,
            removed=[1, 4, 5, 6],
            scores=[{str(i): float(i + 1) for i in range(L)}],
            repair_info={"site": 2, "shifts": shifts},
        ),
        *[record(m, 4, 0.55, 0.55, 40.0, 50.0, 0.0) for m in DEFAULT_AVERAGING],
    ]
    for rec in recs:
        write(root, rec)
    failed = record("ppl", 2, 0, 0, 0, 0, 0, status="failed", error="RuntimeError: boom")
    write(root, failed)
    (root / "toy-angular-n2-abc").mkdir()
    (root / "toy-angular-n2-abc" / "job.log").write_text("killed")  # no result.json: incomplete
    (root / ".hydra").mkdir()  # Hydra's bookkeeping is not a job
    return root


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    return build(sweep, tmp_path_factory.mktemp("report"))


def cell(frame: pd.DataFrame, variant: str, n_remove: int) -> pd.Series:
    rows = frame[(frame["variant"] == variant) & (frame["n_remove"] == n_remove)]
    assert len(rows) == 1, (variant, n_remove, len(rows))
    return rows.iloc[0]


def test_main_table_numbers(report):
    main_df = pd.read_csv(report.out / "main.csv")
    g = cell(main_df, "gradmap", 2)
    assert g["avg"] == pytest.approx(65.0)
    assert g["d_avg"] == pytest.approx(-10.0)
    assert g["retention_pct"] == pytest.approx(100 * 65 / 75)
    assert g["ppl_x_dense"] == pytest.approx(1.5)
    assert g["prune_s"] == pytest.approx(10.0)
    assert g["gradmap_speedup"] == pytest.approx(1.0)
    assert g["mean_speedup"] == pytest.approx((0.1 + 0.3 + 6 + 4) / 4)
    assert g["geomean_speedup"] == pytest.approx((0.1 * 0.3 * 6 * 4) ** 0.25)
    assert g["prefill_speedup"] == pytest.approx(1.5)
    assert g["params_pct"] == pytest.approx(80.0)
    assert g["avg_se"] == pytest.approx(100 * math.sqrt(2 * 0.01**2) / 2)
    assert cell(main_df, "shortgpt", 2)["gradmap_speedup"] == pytest.approx(0.1)
    assert cell(main_df, "sleb", 2)["gradmap_speedup"] == pytest.approx(6.0)
    assert cell(main_df, "streamline", 2)["gradmap_speedup"] == pytest.approx(4.0)
    assert math.isnan(cell(main_df, "shortgpt", 2)["mean_speedup"])  # only on GradMAP's row
    dense = cell(main_df, "none", 0)
    assert dense["avg"] == pytest.approx(75.0) and math.isnan(dense["gradmap_speedup"])
    assert set(main_df["variant"]) == {"none", "gradmap", "shortgpt", "taylor_plus", "sleb", "streamline", "random"}


def test_speedup_table_and_averaging_set(report, sweep):
    sp = pd.read_csv(report.out / "speedup.csv").set_index("n_remove")
    assert sp.loc[2, "mean_speedup"] == pytest.approx(2.6)
    assert sp.loc[2, "geomean_speedup"] == pytest.approx(0.72**0.25)
    assert sp.loc[2, "x_random"] == pytest.approx(0.001)
    assert sp.loc[4, "mean_speedup"] == pytest.approx(5.0) and sp.loc[4, "geomean_speedup"] == pytest.approx(5.0)
    assert sp.loc[2, "averaging_set"] == "shortgpt, taylor_plus, sleb, streamline"
    # 'all' = every baseline present; the random control is never averaged
    every = tables(sweep, parse_averaging("all"))[1].set_index("n_remove")
    assert every.loc[2, "averaged_over"] == "shortgpt, taylor_plus, sleb, streamline"
    assert every.loc[2, "averaging_set"] == "every baseline present"
    # a set member missing from the sweep is named, and the mean is over the others
    two = tables(sweep, Averaging(("sleb", "replaceme")))[1].set_index("n_remove")
    assert two.loc[2, "mean_speedup"] == pytest.approx(6.0) and two.loc[2, "missing_from_set"] == "replaceme"


def test_markdown_and_latex_state_the_set_and_metric_map(report):
    md = (report.out / "main.md").read_text()
    assert "shortgpt, taylor_plus, sleb, streamline" in md
    assert "metric map: acc: boolq, piqa." in md and "PPL (w=128)" in md
    gradmap_row = next(line for line in md.splitlines() if "| gradmap " in line and "| 2/8 " in line)
    assert [c.strip() for c in gradmap_row.split("|")][7:9] == ["65.00", "-10.00"]  # avg and Δavg
    tex = (report.out / "main.tex").read_text()
    assert r"\begin{table}" in tex and r"\caption{" in tex and "tab:main" in tex
    assert (report.out / "speedup.md").read_text().count("2.60") >= 1


def test_verdict_says_when_the_claim_fails(report):
    text = (report.out / "verdict.md").read_text()
    assert "holds in 1 of 2" in text
    assert "Speed claim does not hold**: mean speedup 2.60×" in text
    assert "Speed claim holds**: mean speedup 5.00×" in text
    assert "GradMAP is slower than: shortgpt (0.10×), taylor_plus (0.30×)" in text
    # accuracy at 25%: GradMAP 65 is behind taylor_plus (70) and streamline (66), ahead of shortgpt (60)
    assert "behind 2 (taylor_plus by 5.00 pts, streamline by 1.00 pts)" in text
    assert "does not lose less accuracy than every method here**." in text  # taylor_plus's 5-point lead is real
    assert "timings are from a CPU" in text
    # decode tok/s = prefill / 10: GradMAP 15 vs dense 10; the other 5 methods at 2 of 8 layers 10 -> 1.00x
    assert (
        "decodes 1.50× as fast as dense; over the 6 methods with this layer count 1.00–1.50× (the same "
        "architecture, so the spread is measurement noise)"
    ) in text
    assert "fixed per-call overheads" not in text, "GradMAP's 10 s is not below the short-timing threshold"


def test_jobs_and_plots(report):
    jobs = pd.read_csv(report.out / "jobs.csv")
    assert dict(jobs["status"].value_counts()) == {"ok": 12, "failed": 1, "incomplete": 1}
    for stem in PLOTS:
        for ext in ("png", "pdf"):
            path = report.out / f"{stem}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
    index = (report.out / "README.md").read_text()
    assert "accuracy_vs_ratio.png" in index and "RuntimeError: boom" in index


def test_pareto_front():
    # (time, acc): b dominates c; a is fastest, d most accurate
    times = [1.0, 2.0, 3.0, 10.0]
    accs = [50.0, 60.0, 55.0, 70.0]
    assert pareto_front(pd.Series(times).to_numpy(), pd.Series(accs).to_numpy()).tolist() == [0, 1, 3]


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "nope")])
    assert info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--speedup-baselines", ","])


def test_sweep_without_gradmap_or_dense_still_reports(tmp_path):
    root = tmp_path / "partial"
    write(root, record("shortgpt", 2, 0.6, 0.6, 20.0, 1.0, 0.0))
    write(root, record("sleb", 2, 0.7, 0.6, 14.0, 60.0, 0.0))
    files = build(root, tmp_path / "out", plots=False)
    main_df = pd.read_csv(files.out / "main.csv")
    assert main_df["gradmap_speedup"].isna().all() and main_df["d_avg"].isna().all()
    assert "No verdict" in files.verdict.read_text()


def test_verdict_qualifies_short_times_and_gaps_within_noise(tmp_path):
    root = tmp_path / "fast"
    for rec in (
        record("none", 0, 0.8, 0.7, 10.0, 0.0, 0.0, removed=[]),
        record("gradmap", 2, 0.7, 0.6, 15.0, 1.5, 0.5, removed=[5, 6]),
        record("taylor_plus", 2, 0.71, 0.6, 20.0, 0.5, 0.0),
    ):
        write(root, rec)
    text = (build(root, tmp_path / "report", plots=False).out / "verdict.md").read_text()
    assert "GradMAP prunes in 2 s here, where fixed per-call overheads weigh as much as the passes" in text
    # 65.0 vs 65.5: behind by 0.5 pts, less than the 2-SE noise of 2.0 pts, so the verdict qualifies itself
    assert (
        "does not lose less accuracy than every method here** — though every gap is within noise at this "
        "evaluation size."
    ) in text


def test_verdict_flags_timings_taken_on_a_shared_device(tmp_path):
    """A method timed while another job ran on its GPU gets one flag line; records without a placement block, or
    with other jobs on other GPUs of the node only, are not flagged."""
    alone = {"launcher": "ray", "device_key": "gpu:GPU-1", "node_jobs": 4, "same_device_jobs": [], "shared": False}
    shared = {**alone, "launcher": "parallel", "same_device_jobs": ["toy-sleb-n2"], "shared": True}
    root = tmp_path / "placed"
    for rec in (
        record("none", 0, 0.8, 0.7, 10.0, 0.0, 0.0, removed=[]),
        record("gradmap", 2, 0.7, 0.6, 15.0, 8.0, 2.0, removed=[5, 6], placement=alone),
        record("shortgpt", 2, 0.6, 0.6, 20.0, 1.0, 0.0, placement=shared),
        record("taylor_plus", 2, 0.71, 0.6, 20.0, 3.0, 0.0),  # written before placement was recorded
    ):
        write(root, rec)
    text = (build(root, tmp_path / "report", plots=False).out / "verdict.md").read_text()
    flags = [line for line in text.splitlines() if line.startswith("**Timing flag:**")]
    assert flags == [
        "**Timing flag:** shortgpt was timed while other jobs ran on the same device (result.json "
        "`placement.same_device_jobs`); those times, and the speedups built on them, are not comparable: rerun "
        "them one job per device (docs/reports.md, Launchers)."
    ]
    main_df = pd.read_csv(tmp_path / "report" / "main.csv")
    assert cell(main_df, "shortgpt", 2)["shared_device"] == 1 and cell(main_df, "gradmap", 2)["shared_device"] == 0
    assert math.isnan(cell(main_df, "taylor_plus", 2)["shared_device"])


# ------------------------------------------------------------------------------------ paired statistics, evidence


def correlated_pair(n: int, flips: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two methods on the same n items: b is a with ``flips`` of a's correct items turned wrong (hard items are hard
    for both, as between two pruned copies of one model)."""
    rng = np.random.default_rng(seed)
    a = (rng.uniform(size=n) < rng.uniform(size=n)).astype(float)
    b = a.copy()
    b[rng.choice(np.flatnonzero(a == 1), flips, replace=False)] = 0
    return a, b


def test_paired_ci_detects_what_the_independent_rule_calls_noise():
    a, b = correlated_pair(1000, 40, seed=1)  # a is 4.0 points ahead on the same items
    iv = paired_bootstrap(a, b)
    assert iv.estimate == pytest.approx(0.04) and iv.n == 1000
    assert iv.significant and iv.low > 0.02, iv
    noise = independent_noise(a, b)
    assert abs(a.mean() - b.mean()) < noise, "the independent-samples rule must call this gap noise"
    avg = stratified_paired_bootstrap([(a[:500], b[:500]), (a[500:], b[500:])])
    assert avg.significant and avg.n == 1000


def test_zero_difference_covers_zero_at_the_stated_rate():
    """Two methods with the same accuracy on every item in expectation: the 95 % CI must cover 0 about 95 % of the
    time (binomial 99 % band for 200 trials: 176..198 of 200)."""
    covered = 0
    trials = 200
    for seed in range(trials):
        rng = np.random.default_rng(1000 + seed)
        p = rng.uniform(size=300)
        a = (rng.uniform(size=300) < p).astype(float)
        b = (rng.uniform(size=300) < p).astype(float)
        iv = paired_bootstrap(a, b, resamples=1000, seed=seed)
        covered += iv.low <= 0 <= iv.high
    assert 176 <= covered <= 198, covered


def test_ppl_and_ratio_intervals():
    rng = np.random.default_rng(0)
    base = rng.normal(400, 40, 30)
    iv = ppl_paired_bootstrap(base + 5, base, np.full(30, 100))  # +0.05 nats per token on every window
    expected = np.exp((base.sum() + 150) / 3000) - np.exp(base.sum() / 3000)
    assert iv.estimate == pytest.approx(expected) and iv.significant and iv.n == 30
    ratio = ratio_bootstrap([10.0, 11.0, 9.0], [1.0, 1.1, 0.9])
    assert ratio.estimate == pytest.approx(10.0) and ratio.low <= 10.0 <= ratio.high
    assert np.isnan(ratio_bootstrap([10.0], [1.0, 1.1]).low), "one timing has no CI"
    with pytest.raises(ValueError, match="resamples=10"):
        paired_bootstrap([1, 0], [0, 0], resamples=10)


def test_items_roundtrip_is_deterministic(tmp_path):
    rows = [{"task": "boolq", "doc_id": 3, "acc": 1.0}, {"task": "wikitext2_ppl", "doc_id": 0, "nll": 1.5, "tokens": 7}]
    assert write_items(tmp_path / "a" / ITEMS_FILE, rows) == 2
    write_items(tmp_path / "b" / ITEMS_FILE, rows)
    assert (tmp_path / "a" / ITEMS_FILE).read_bytes() == (tmp_path / "b" / ITEMS_FILE).read_bytes()
    assert read_items(tmp_path / "a") == rows
    (tmp_path / "c.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="unreadable"):
        read_items(tmp_path / "c.gz")


N_ITEMS = 400


def items_for(acc: np.ndarray, nll: np.ndarray) -> list[dict]:
    """boolq and piqa items (acc) + 8 PPL windows, in the items.jsonl.gz layout."""
    half = len(acc) // 2
    rows = [{"task": "boolq", "doc_id": i, "doc_hash": f"b{i}", "acc": float(v)} for i, v in enumerate(acc[:half])]
    rows += [{"task": "piqa", "doc_id": i, "doc_hash": f"p{i}", "acc": float(v)} for i, v in enumerate(acc[half:])]
    rows += [{"task": "wikitext2_ppl", "doc_id": i, "nll": float(v), "tokens": 100} for i, v in enumerate(nll)]
    return rows


@pytest.fixture(scope="module")
def evidence(tmp_path_factory):
    """A sweep with items and two seeds per pruned method: GradMAP 4 points ahead of shortgpt on the same items."""
    root = tmp_path_factory.mktemp("runs") / "evidence"
    a, b = correlated_pair(N_ITEMS, 16, seed=3)
    dense = np.clip(a + (1 - a) * (np.arange(N_ITEMS) % 3 == 0), 0, 1)
    windows = np.full(8, 300.0) + np.arange(8)
    specs = [("none", 0, dense, windows, [], 0), ("gradmap", 2, a, windows + 20, [5, 6], 0)]
    specs += [("gradmap", 2, a, windows + 20, [5, 7], 1), ("shortgpt", 2, b, windows + 40, [5, 6], 0)]
    specs += [("shortgpt", 2, b, windows + 40, [5, 6], 1)]
    for method, n, acc, nll, removed, seed in specs:
        half = N_ITEMS // 2
        rec = record(method, n, acc[:half].mean(), acc[half:].mean(), float(np.exp(nll.sum() / 800)), 8.0 + seed,
                     2.0, removed=removed, seed=seed)  # fmt: skip
        rec["job_name"] += f"-s{seed}"
        rec["metrics"]["items_file"] = ITEMS_FILE
        rec["config"]["calib"] = {"n_samples": 4, "seq_len": 64}
        rec["lm_eval"] = {"throughput": {"requests": 400, "seconds": 4.0 + seed, "requests_per_s": 400 / (4 + seed)}}
        write(root, rec)
        write_items(root / f"{rec['job_name']}-{rec['job_id']}" / ITEMS_FILE, items_for(acc, nll))
    return root, build(root, tmp_path_factory.mktemp("evidence_report"))


def test_paired_csv_has_cis_and_the_verdict_counts_only_excluding_cis(evidence):
    _, files = evidence
    paired = pd.read_csv(files.out / "paired.csv")
    for col in ("diff", "ci_low", "ci_high", "significant", "n_items", "runs_a", "runs_b"):
        assert col in paired, col
    row = paired[(paired["a"] == "gradmap") & (paired["b"] == "shortgpt") & (paired["metric"] == "avg")].iloc[0]
    assert row["diff"] == pytest.approx(100 * 16 / N_ITEMS) and row["n_items"] == N_ITEMS
    assert row["ci_low"] > 0 and bool(row["significant"]) and row["runs_a"] == 2
    ppl = paired[(paired["a"] == "gradmap") & (paired["b"] == "shortgpt") & (paired["metric"] == "ppl")].iloc[0]
    assert ppl["diff"] < 0 and ppl["ci_high"] < 0 and ppl["n_items"] == 8
    assert set(paired["b"]) >= {"none", "shortgpt"}
    text = files.verdict.read_text()
    assert f"95 % CI over {N_ITEMS} items per comparison): GradMAP is ahead of 1 of 1 methods" in text
    assert "PPL, paired over 8 windows" in text
    assert NO_ITEMS not in text.split("## toy")[1]


def test_seeds_give_mean_std_and_stability(evidence):
    _, files = evidence
    main_df = pd.read_csv(files.out / "main.csv")
    g = cell(main_df, "gradmap", 2)
    assert g["runs"] == 2 and g["seeds"] == 2 and g["prune_s_std"] == pytest.approx(np.std([10.0, 11.0], ddof=1))
    stab = pd.read_csv(files.out / "stability.csv")
    seeds = stab[stab["axis"] == "seed"].set_index("variant")
    assert seeds.loc["gradmap", "mean_jaccard"] == pytest.approx(jaccard((5, 6), (5, 7)), abs=1e-4)  # 1/3, 4 digits
    assert seeds.loc["shortgpt", "mean_jaccard"] == pytest.approx(1.0)
    assert r"\pm" in (files.out / "main.tex").read_text()


def test_lm_eval_throughput_is_shown_where_recorded(report, evidence):
    _, files = evidence
    g = cell(pd.read_csv(files.out / "main.csv"), "gradmap", 2)
    assert g["eval_req_s"] == pytest.approx(np.median([100.0, 80.0]))  # median over the two seeds' runs
    assert "lm-eval (req/s)" in (files.out / "main.md").read_text()
    assert "lm-eval (req/s)" not in (report.out / "main.md").read_text(), "no column of dashes for old records"


def test_reports_without_items_say_so(report):
    assert NO_ITEMS in (report.out / "paired.md").read_text()
    assert NO_ITEMS in report.verdict.read_text()


def test_figure_whiskers_say_what_they_are_and_never_claim_cis(report, evidence):
    from gradmap.report.style import whisker_note

    without, with_items = (pd.read_csv(files.out / "main.csv") for files in (report, evidence[1]))
    assert NO_ITEMS in whisker_note(without) and "standard error" in whisker_note(without)
    assert NO_ITEMS not in whisker_note(with_items) and "paired.csv" in whisker_note(with_items)


def pdf_facts(path: Path) -> tuple[float, bool, bool]:
    """(page width in inches, embeds a TrueType font file, uses a Type 3 font) of a matplotlib PDF."""
    data = path.read_bytes()
    box = re.search(rb"/MediaBox\s*\[\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*\]", data)
    assert box, path
    width = (float(box.group(3)) - float(box.group(1))) / 72
    return width, b"/FontFile2" in data, b"/Type3" in data


def test_every_pdf_is_paper_ready(report, evidence):
    pdfs = sorted(report.out.glob("*.pdf")) + sorted(evidence[1].out.glob("*.pdf"))
    assert {"claim.pdf", "stability.pdf", "per_task.pdf", "equal_compute.pdf"} <= {p.name for p in pdfs}
    for path in pdfs:
        width, truetype, type3 = pdf_facts(path)
        assert width <= 7.0 + 1e-6, (path.name, width)
        assert truetype and not type3, path.name


def test_claim_figure_and_native_protocol_missing(report):
    claim = pd.read_csv(report.out / "claim.csv")
    assert set(claim["protocol"]) == {"matched"}
    sleb = claim[(claim["variant"] == "sleb") & (claim["n_remove"] == 2)].iloc[0]
    assert sleb["speedup"] == pytest.approx(6.0) and bool(sleb["in_set"])
    assert "no runs at native settings in this sweep" in report.verdict.read_text()


def test_main_tex_is_booktabs_blocks_and_compiles(report, evidence, tmp_path):
    tex = (report.out / "main.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count(r"\multicolumn") == 3  # dense, 25 %, 50 %
    assert "Taylor+" in tex and "taylor_plus" not in tex and r"\textbf{" in tex
    assert re.search(r"\\begin\{tabular\}\{lr+\}", tex)
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex here: structure checked only (apt-get install texlive-latex-recommended)")
    for source in (report.out / "main.tex", evidence[1].out / "paired.tex", evidence[1].out / "main.tex"):
        doc = tmp_path / f"{source.parent.name}-{source.name}"
        doc.write_text(standalone(source.read_text()))
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:]


def test_stability_axes_and_jaccard():
    rows = pd.DataFrame(
        {
            "model": "m", "eval": "e", "variant": "x", "method": "x", "n_remove": 2, "n_layers": 8,
            "seed": [0, 1, 0], "calib_tokens": [256, 256, 512],
            "removed_layers": [(1, 2), (1, 3), (4, 5)],
        }
    )  # fmt: skip
    stab = stability_table(rows).set_index("axis")
    assert stab.loc["seed", "pairs"] == 1 and stab.loc["seed", "mean_jaccard"] == pytest.approx(1 / 3)
    assert stab.loc["calib_size", "pairs"] == 2 and stab.loc["calib_size", "mean_jaccard"] == 0.0
    assert jaccard((), ()) == 1.0


def test_run_seeds_on_one_calibration_draw_are_not_calibration_seeds():
    """Two runs that differ in ``seed`` but drew the same windows (``calib.seed`` pinned) give no seed-axis pair and
    the caption says one calibration draw (the reference study's seeds 1-2 once repeated seed 0's windows)."""
    rows = pd.DataFrame(
        {
            "model": "m", "eval": "e", "variant": "x", "method": "x", "n_remove": 2, "n_layers": 8,
            "seed": [0, 1, 2], "calib_seed": [0, 0, 1], "calib_tokens": 256,
            "removed_layers": [(1, 2), (1, 2), (1, 3)],
        }
    )  # fmt: skip
    stab = stability_table(rows).set_index("axis")
    assert stab.loc["seed", "pairs"] == 2 and stab.loc["seed", "mean_jaccard"] == pytest.approx(1 / 3)
    same_draw = pd.DataFrame({"seeds": [2], "calib_seeds": [1]})
    assert "2 run seeds on one calibration draw" in short_caption(same_draw)
    assert "calibration seeds" not in short_caption(same_draw)
    assert "3 calibration seeds" in short_caption(pd.DataFrame({"seeds": [3], "calib_seeds": [3]}))


def test_verdict_states_unequal_runs_behind_rows():
    """A GradMAP row over two calibration draws beside baselines over one says so (the reference study's shape)."""
    from gradmap.report.verdicts import _runs_line

    rows = pd.DataFrame(
        {"method": ["none", "gradmap", "shortgpt"], "runs": [1, 2, 1], "calib_seeds": [1, 2, 1]},
        index=["none", "gradmap", "shortgpt"],
    )
    (line,) = _runs_line(rows)
    assert "gradmap: 2 run(s), 2 calibration draw(s)" in line and "shortgpt: 1 run(s), 1 calibration draw(s)" in line
    assert "none:" not in line and "runs' mean" in line
    (equal,) = _runs_line(rows.assign(runs=1, calib_seeds=1))
    assert "runs' mean" not in equal


def test_removed_layer_grid_takes_sets_of_different_sizes():
    """BlockPruner removes half layers, so its whole-layer set is shorter than the others' (the shipped offline_main
    report failed with numpy's 'inhomogeneous shape' here)."""
    import matplotlib.pyplot as plt

    from gradmap.report.plots import removed_grid

    fig, ax = plt.subplots()
    removed_grid(ax, ["a", "b"], [(1, 2, 3), (5,)], 8)
    shown = ax.images[0].get_array()
    plt.close(fig)
    assert shown.shape == (2, 8) and shown.sum() == 4 and shown[1, 5] == 1


def test_verdict_says_who_is_best_at_equal_pruning_time():
    """The most accurate method within GradMAP's pruning time, and the fastest one not behind GradMAP by a paired
    CI; controls are left out (the reference study's Gemma cell: streamline is both)."""
    from gradmap.report.verdicts import _equal_time_lines

    others = pd.DataFrame(
        {"method": ["shortgpt", "sleb", "streamline", "random"], "avg": [38.3, 37.8, 40.7, 45.0],
         "prune_s": [2.0, 183.0, 5.2, 0.001]},
        index=["shortgpt", "sleb", "streamline", "random"],
    )  # fmt: skip
    g = pd.Series({"avg": 37.05, "prune_s": 40.9})
    ci = {
        "shortgpt": {"diff": -1.27, "ci_low": -2.23, "ci_high": -0.27, "significant": True, "n_items": 20465},
        "sleb": {"diff": -0.77, "ci_low": -1.76, "ci_high": 0.20, "significant": False, "n_items": 20465},
        "streamline": {"diff": -3.68, "ci_low": -4.65, "ci_high": -2.69, "significant": True, "n_items": 20465},
        "random": {"diff": -7.9, "ci_low": -9.0, "ci_high": -7.0, "significant": True, "n_items": 20465},
    }
    best, fastest = _equal_time_lines(others, g, ci)
    assert "of the 2 methods that prune in 40.9 s (GradMAP's time) or less, streamline is the most accurate" in best
    assert "random" not in best and "40.70% in 5.2 s" in best
    assert fastest.startswith("The fastest method not behind GradMAP in accuracy (paired CI) is shortgpt: 2 s")
    alone = _equal_time_lines(others.drop(index="streamline"), pd.Series({"avg": 39.0, "prune_s": 40.9}), ci)[0]
    assert alone.startswith("At equal pruning time: GradMAP (39.00%, 40.9 s) is the most accurate of the 2 methods")
