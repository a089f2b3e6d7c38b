"""`make chaos`: a 12-job tiny_llama sweep with 3 injected faults must lose only those 3 jobs, and five more faults
against the result writer, force reruns, records, claims and caches must each lose nothing.

Faults (through the test-only switch in gradmap/faults.py, which needs GRADMAP_ALLOW_FAULTS=1):
an exception, NaN weights after pruning, and a killed process (os._exit, no cleanup). Each job runs in its own
process (hydra/launcher=local, submitit), as on a cluster, so a killed job cannot take its neighbours with it.

Checks, in order, each printed with what it proved: after the faulty sweep the 9 other results are ok, the
exception and the NaN are recorded as failed with a one-line error, the killed job left no result.json; a rerun
without faults recomputes exactly those 3 jobs and leaves the 9 finished files byte for byte as they were. Then:
SIGKILL a process that rewrites a 2 MB result.json in a loop, at least 20 times and until a kill has landed
mid-write (a partial temp file is left behind): the file is always a complete record; a ``force=true`` rerun killed
after pruning (the finished result survives byte for byte); a truncated and a stub ``{"status": "ok"}`` record
(``gradmap.sweep`` lists both as corrupt by path, the rerun recomputes exactly those two); two processes on one job
(held 20 s by the ``slow`` fault: computed once, the other says it is claimed); two ``model=smollm2_135m`` jobs
started together on an empty GRADMAP_CACHE (both finish; one published model copy and one calibration entry, no temp
leftovers). That last check runs through scripts/run_tiny_gguf.py, which swaps the GGUF's weights for a tiny Llama
so the real cache code runs in seconds; ``--real-model`` dequantizes the real SmolLM2 GGUF instead.
Measured 2026-12-02 on the shared 2-core box (load average 3-11): 874 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["gradmap", "shortgpt", "taylor", "angular", "random", "last_n"]
RATIOS = ["0.25", "0.5"]
FAULTS = {"tiny_llama-shortgpt-r0.25": "raise", "tiny_llama-taylor-r0.5": "nan", "tiny_llama-angular-r0.25": "kill"}


BASE = ["eval=none", "tracker=none", "calib.n_samples=2", "calib.seq_len=32", "speed.enabled=false"]


def environment(faults: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADMAP_TEST_FAULT")}
    env.update({"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if faults:
        env.update(
            {
                "GRADMAP_ALLOW_FAULTS": "1",
                "GRADMAP_TEST_FAULT": ",".join(f"{job}:{kind}" for job, kind in faults.items()),
            }
        )
    return env | extra


def sweep(runs: Path, faults: dict[str, str] | None) -> subprocess.CompletedProcess:
    env = environment(faults)
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
    parser.add_argument(
        "--real-model", action="store_true", help="the empty-cache check dequantizes the real SmolLM2 GGUF (heavy)"
    )
    args = parser.parse_args()
    runs = args.keep or Path(tempfile.mkdtemp(prefix="gradmap-chaos-"))
    jobs = {f"tiny_llama-{m}-r{r}" for m in METHODS for r in RATIOS}
    began = time.perf_counter()

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
    kill_the_writer(runs)
    force_rerun_killed(runs)
    corrupt_and_stub_records(runs, final)
    two_processes_one_job(runs)
    two_jobs_empty_cache(runs, args.real_model)
    print(f"chaos passed in {time.perf_counter() - began:.0f} s ({runs})")


WRITER = """
import sys
from gradmap.results import atomic_write_json
big = {"status": "ok", "pad": "x" * 2_000_000}
i = int(sys.argv[2])
while True:
    atomic_write_json(sys.argv[1], {**big, "version": i})
    i += 1
"""


def kill_the_writer(runs: Path, kills: int = 20, most: int = 60) -> None:
    """SIGKILL a process that rewrites a 2 MB result.json in a loop, at random moments: at least ``kills`` times and
    until one kill has landed mid-write (its half-written temp file is left behind), at most ``most`` times."""
    target = runs / "writer" / "result.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    mid_write = done = 0
    for k in range(most):
        if k >= kills and mid_write:
            break
        done = k + 1
        temps = len(list(target.parent.glob(".result.json.*.tmp")))
        start = (k + 1) * 1_000_000  # this writer's versions, so the kill lands while it is writing
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(start)], cwd=ROOT, env=environment())
        deadline = time.time() + 300
        while time.time() < deadline and not (target.exists() and json.loads(target.read_text())["version"] >= start):
            time.sleep(0.05)
        time.sleep(random.uniform(0.05, 0.5))
        proc.kill()
        proc.wait()
        seen.add(json.loads(target.read_text())["version"] // 1_000_000)  # raises if the file is ever half-written
        mid_write += len(list(target.parent.glob(".result.json.*.tmp"))) > temps
    check(
        seen == set(range(1, done + 1)) and mid_write > 0,
        f"SIGKILL x{done} while a writer rewrote a 2 MB result.json, {mid_write} of them mid-write (a partial temp "
        "file left behind): after every kill result.json was a complete record from that writer: writes are atomic",
    )


def single(runs: Path, sweep_name: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "run.py", "model=tiny_llama", *BASE, f"sweep={sweep_name}", f"runs_dir={runs}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env or environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def force_rerun_killed(runs: Path) -> None:
    """force=true on a finished job, killed after pruning: the old result must survive."""
    (path,) = [p for p in (runs / "chaos").glob("tiny_llama-gradmap-r0.25-*/result.json")]
    before = path.read_bytes()
    proc = single(
        runs, "chaos", "method=gradmap", "prune.ratio=0.25", "force=true", env=environment({"gradmap-r0.25": "kill"})
    )
    out = proc.communicate(timeout=900)[0].decode()
    check(proc.returncode == 137 and "injecting test fault 'kill'" in out, "force=true rerun was killed mid-run")
    check(path.read_bytes() == before, "force=true killed mid-run: the finished result.json is byte for byte intact")


def corrupt_and_stub_records(runs: Path, final: dict[str, dict]) -> None:
    """A truncated and a stub record are listed as corrupt and recomputed; nothing else is touched."""
    truncated = next((runs / "chaos").glob("tiny_llama-random-r0.25-*/result.json"))
    stub = next((runs / "chaos").glob("tiny_llama-last_n-r0.5-*/result.json"))
    truncated.write_bytes(truncated.read_bytes()[:200])
    stub.write_text('{"status": "ok"}')
    status = subprocess.run(
        [sys.executable, "-m", "gradmap.sweep", str(runs / "chaos")], cwd=ROOT, env=environment(), capture_output=True
    ).stdout.decode()
    check(
        status.count("corrupt") >= 2 and str(truncated) in status and str(stub) in status,
        "gradmap.sweep lists the truncated and the stub record as corrupt, by path",
    )
    rerun = sweep(runs, None)
    check(rerun.returncode == 0, "rerun after corrupting two records succeeds")
    after = results(runs)
    redone = {n for n, r in after.items() if r["bytes"] != final[n]["bytes"]}
    check(
        redone == {"tiny_llama-random-r0.25", "tiny_llama-last_n-r0.5"}
        and all(r["record"]["status"] == "ok" for r in after.values()),
        f"the rerun recomputed exactly the corrupt and the stub record: {sorted(redone)}",
    )


def two_processes_one_job(runs: Path) -> None:
    """Two processes on one job at once: one computes it (held 20 s by the slow fault), the other skips."""
    env = environment({"sleb-r0.25": "slow"})
    procs = [single(runs, "claims", "method=sleb", "prune.ratio=0.25", env=env) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0].decode() for p in procs]
    log_text = next((runs / "claims").glob("tiny_llama-sleb-r0.25-*/job.log")).read_text()
    check(
        all(p.returncode == 0 for p in procs)
        and log_text.count("removed layers") == 1
        and sum("is computing this job now" in o for o in outs) == 1,
        "two processes on one job: computed once; the second said the job is claimed and skipped it",
    )


def two_jobs_empty_cache(runs: Path, real_model: bool = False) -> None:
    """Two jobs of the default model started together on an empty cache (model and calibration) both finish.

    By default through scripts/run_tiny_gguf.py: the GGUF's weights become a tiny Llama, everything after them (the
    tokenizer from the GGUF, the model-cache publish, the calibration cache, pruning, the record) is the real code,
    so this check takes seconds of CPU. ``--real-model`` dequantizes the real SmolLM2 GGUF twice instead."""
    cache = runs / "empty-cache"
    env = environment(GRADMAP_CACHE=str(cache))
    entry = "run.py" if real_model else "scripts/run_tiny_gguf.py"
    procs = [
        subprocess.Popen(
            [sys.executable, entry, "model=smollm2_135m", *BASE, "sweep=cache", f"runs_dir={runs}", f"method={m}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for m in ("shortgpt", "angular")
    ]
    outs = [p.communicate(timeout=1800)[0].decode() for p in procs]
    ok = [json.loads(p.read_text())["status"] for p in (runs / "cache").glob("*/result.json")]
    calib = list((cache / "calib").glob("calib-*.safetensors"))
    leftovers = [p.name for p in cache.rglob("*") if p.name.startswith(".") or "corrupt" in p.name]
    weights = "SmolLM2's real weights" if real_model else "GGUF weights swapped for a tiny Llama"
    check(
        all(p.returncode == 0 for p in procs)
        and ok == ["ok", "ok"]
        and len(list((cache / "models").glob("smollm2_135m-transformers*/config.json"))) == 1
        and len(calib) == 1
        and not leftovers,
        f"two jobs started together on an empty cache both finished ({weights}): one published model and one "
        "calibration entry, no temp leftovers (private temp names, atomic publish, finished twin kept)"
        + ("" if all(p.returncode == 0 for p in procs) else f": {outs[0][-300:]} {outs[1][-300:]}"),
    )


if __name__ == "__main__":
    main()
