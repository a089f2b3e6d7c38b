"""`make chaos`: a 12-job tiny_llama sweep with 3 injected faults must lose only those 3 jobs.

Faults (through the test-only switch in gradmap/faults.py, which needs GRADMAP_ALLOW_FAULTS=1):
an exception, NaN weights after pruning, and a killed process (os._exit, no cleanup). Each job runs in its own
process (hydra/launcher=local, submitit), as on a cluster, so a killed job cannot take its neighbours with it.

Checks: after the faulty sweep, the 9 other results are ok; the exception and the NaN are recorded as failed
with a one-line error; the killed job left no result.json. A rerun without faults then recomputes exactly those
3 jobs and leaves the 9 finished result files byte for byte as they were.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["gradmap", "shortgpt", "taylor", "angular", "random", "last_n"]
RATIOS = ["0.25", "0.5"]
FAULTS = {"tiny_llama-shortgpt-r0.25": "raise", "tiny_llama-taylor-r0.5": "nan", "tiny_llama-angular-r0.25": "kill"}


def sweep(runs: Path, faults: dict[str, str] | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADMAP_TEST_FAULT")}
    env.update({"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if faults:
        env.update(
            {
                "GRADMAP_ALLOW_FAULTS": "1",
                "GRADMAP_TEST_FAULT": ",".join(f"{job}:{kind}" for job, kind in faults.items()),
            }
        )
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "model=tiny_llama",
        "eval=none",
        "tracker=none",
        "sweep=chaos",
        f"runs_dir={runs}",
        "calib.n_samples=2",
        "calib.seq_len=32",
        "speed.enabled=false",
        "hydra/launcher=local",
        f"method={','.join(METHODS)}",
        f"prune.ratio={','.join(RATIOS)}",
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def results(runs: Path) -> dict[str, dict]:
    """job name (without the id) → record, for every result.json of the sweep."""
    out = {}
    for path in (runs / "chaos").glob("*/result.json"):
        record = json.loads(path.read_text())
        out[record["job_name"]] = {"record": record, "bytes": path.read_bytes()}
    return out


def check(condition: bool, message: str) -> None:
    print(("ok    " if condition else "FAIL  ") + message)
    if not condition:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep the runs folder here instead of a temp dir")
    args = parser.parse_args()
    runs = args.keep or Path(tempfile.mkdtemp(prefix="gradmap-chaos-"))
    jobs = {f"tiny_llama-{m}-r{r}" for m in METHODS for r in RATIOS}

    start = time.perf_counter()
    first = sweep(runs, FAULTS)
    print(f"faulty sweep: exit {first.returncode} in {time.perf_counter() - start:.0f} s")
    after = results(runs)
    ok = {name for name, r in after.items() if r["record"]["status"] == "ok"}
    check(ok == jobs - set(FAULTS), f"{len(ok)} of 12 jobs ok, exactly the 9 without a fault")
    raised = after.get("tiny_llama-shortgpt-r0.25", {}).get("record", {})
    check(
        raised.get("status") == "failed" and "InjectedFault" in raised.get("error", ""),
        f"exception recorded as failed: {raised.get('error')!r}",
    )
    nan = after.get("tiny_llama-taylor-r0.5", {}).get("record", {})
    check(
        nan.get("status") == "failed" and "NaN/inf" in nan.get("error", ""),
        f"NaN recorded as failed: {nan.get('error')!r}",
    )
    check("tiny_llama-angular-r0.25" not in after, "killed job left no result.json")

    start = time.perf_counter()
    second = sweep(runs, None)
    print(f"rerun: exit {second.returncode} in {time.perf_counter() - start:.0f} s")
    check(second.returncode == 0, "rerun without faults succeeds")
    final = results(runs)
    check({n for n, r in final.items() if r["record"]["status"] == "ok"} == jobs, "all 12 jobs ok after the rerun")
    check(all(final[name]["bytes"] == after[name]["bytes"] for name in ok), "the 9 finished results are untouched")
    recomputed = {name for name in jobs if name not in ok and final[name]["bytes"] != after.get(name, {}).get("bytes")}
    check(recomputed == set(FAULTS), f"the rerun computed exactly the 3 faulty jobs: {sorted(recomputed)}")
    print(f"chaos passed ({runs})")


if __name__ == "__main__":
    main()
