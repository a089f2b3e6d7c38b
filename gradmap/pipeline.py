"""The whole pipeline on one page: load → calibrate → select → repair → evaluate → record.

``run_job`` does the work of one configured job; ``execute`` wraps it so that a failure costs that job alone:
the error goes to ``result.json`` (status "failed", one-line message) and the traceback to ``error.log``, the
tracker is always closed, and the caller (a Hydra sweep) carries on.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import socket
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradmap.config import validate
from gradmap.core.components import NonFiniteError, model_device
from gradmap.core.layers import decoder_layers
from gradmap.core.prune import PruneResult, prune
from gradmap.core.sharing import take_seat
from gradmap.eval.items import ITEMS_FILE
from gradmap.eval.lmeval_tasks import check_online_reachable, save_results_json
from gradmap.eval.speed import measure_from_config
from gradmap.faults import inject as inject_fault
from gradmap.modelcard import model_folder, push_to_hub, save_pruned_model
from gradmap.models import load_model, placement_kwargs, resolve_device, resolve_dtype, with_model_bos
from gradmap.results import (
    RESULT_FILE,
    JobClaim,
    atomic_write_json,
    atomic_write_text,
    check_record,
    stable_hash,
    versions,
    without_default,
)
from gradmap.splits import calibration, dev_fields, dev_split
from gradmap.sweep import reuse_dense
from gradmap.tracking import Tracker, artifact_name, make_tracker, resolve_mode

log = logging.getLogger("gradmap")


@dataclass
class Job:
    """Where a job writes and how it is named; ``job_id`` is a stable hash of what changes its result."""

    job_id: str
    name: str
    dir: Path
    identity: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Job:
        cfg = with_model_bos(cfg)  # every caller (execute, the sweep summary, the report) gets the same job id
        device = torch.device("cuda" if cfg["device"] == "auto" and torch.cuda.is_available() else "cpu")
        if str(cfg["device"]).startswith("cuda"):
            device = torch.device("cuda")  # identity needs only the type; availability is checked later
        method = cfg["method"]["name"]
        prune_cfg = effective_prune(cfg["prune"])
        identity = {
            "model": cfg["model"],
            "method": cfg["method"],
            "repair": cfg["repair"],
            "prune": prune_cfg,
            # a default spelt out (calib.protocol=matched, eval.loop=lm_eval) is the same job as the key left out,
            # so records made before the key existed keep their ids
            "calib": without_default(cfg["calib"], "protocol", "matched"),
            "eval": without_default(cfg["eval"], "loop", "lm_eval"),
            "seed": cfg["seed"],
            "dtype": effective_dtype_name(cfg["dtype"], device),
        }
        if method == "none":  # the dense reference depends on model, evaluation and dtype only
            for key in ("method", "repair", "prune", "calib", "seed"):
                identity.pop(key)
            identity["method"] = "none"
        job_id = stable_hash(identity)
        n = prune_cfg.get("n_remove")
        amount = "dense" if method == "none" else (f"n{n}" if n is not None else f"r{prune_cfg['ratio']}")
        repair = cfg["repair"].get("name")
        parts = [cfg["model"]["name"], method] + ([repair] if repair and method != "none" else []) + [amount]
        name = "-".join(str(p) for p in parts)
        folder = Path(cfg["runs_dir"]) / str(cfg["sweep"]) / f"{name}-{job_id}"
        if not folder.resolve().is_relative_to(Path(cfg["runs_dir"]).resolve()) or "/" in name:
            raise ValueError(f"job folder {str(folder)!r} would lie outside runs_dir={str(cfg['runs_dir'])!r}")
        return cls(job_id, name, folder, identity)


def device_label(cfg: Mapping[str, Any]) -> str:
    """The device a job will run on, for its start line (a bad name is shown as given; it fails later)."""
    try:
        return str(resolve_device(cfg["device"]))
    except ValueError:
        return str(cfg["device"])


def effective_dtype_name(name: str, device: torch.device) -> str:
    """The dtype as it acts (auto -> float32 or bfloat16 by device type; fp32 is the same job as float32).

    An unknown name is kept as given so the job still gets an id and fails later with a one-line error.
    """
    try:
        return str(resolve_dtype(name, device)).removeprefix("torch.")
    except ValueError:
        return str(name)


def effective_prune(prune_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The prune settings as they act: ``ratio=null`` + ``default_ratio=0.25`` is the same job as ``ratio=0.25``."""
    out = {k: v for k, v in prune_cfg.items() if k != "default_ratio"}
    if out.get("ratio") is None and out.get("n_remove") is None:
        out["ratio"] = prune_cfg.get("default_ratio")
    return out


def prune_from_config(model, calib_ids: torch.Tensor, cfg: Mapping[str, Any], dev_ids=None) -> PruneResult:
    """Map the Hydra config onto ``prune()``: the same API a notebook user calls."""
    p = cfg["prune"]
    acting = effective_prune(p) if cfg["method"]["name"] != "none" else p
    ratio, n_remove = acting.get("ratio"), acting.get("n_remove")
    selector_options = dict(cfg["method"].get("options") or {})
    for key in ("protect_first", "protect_last", "micro_batch_size"):
        if p.get(key) is not None and cfg["method"]["name"] != "none":
            selector_options.setdefault(key, p[key])
    if cfg["method"]["name"] != "none":
        selector_options.setdefault("seed", cfg["seed"])
    return prune(
        model,
        calib_ids,
        method=cfg["method"]["name"],
        ratio=ratio,
        n_remove=n_remove,
        repair=cfg["repair"].get("name"),
        repair_options=dict(cfg["repair"].get("options") or {}),
        repeats=int((cfg.get("timing") or {}).get("repeats", 1)),
        dev_ids=dev_ids,
        **selector_options,
    )


def run_job(cfg: Mapping[str, Any], job: Job, tracker: Tracker | None = None) -> dict[str, Any]:
    """Do one job and return its record (status "ok"). Raises on failure; see :func:`execute`."""
    from gradmap.eval.harness import evaluate  # lm-eval lives at the edge

    tracker = tracker or Tracker()

    torch.manual_seed(int(cfg["seed"]))
    device = resolve_device(cfg["device"])
    seat = take_seat(job.name, device)  # from now on other jobs see this one on its device (core/sharing.py)
    phases: dict[str, float] = {}

    t = time.perf_counter()
    log.info("%s: loading %s", job.name, cfg["model"]["name"])  # off a TTY these lines are the progress
    model, tokenizer = load_model(cfg["model"], device, cfg["dtype"])  # load
    phases["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    calib_ids = calibration(cfg["calib"], tokenizer)  # calibrate
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and calib_ids.shape[1] > max_len:
        raise ValueError(
            f"calib.seq_len={calib_ids.shape[1]} exceeds the model's max_position_embeddings="
            f"{max_len}; allowed: 2..{max_len}"
        )
    dev = dev_split(cfg["calib"], tokenizer)  # held-out dev windows (None without calib.dev)
    phases["calib_s"] = time.perf_counter() - t

    if cfg["method"]["name"] != "none":
        log.info("%s: selecting and repairing (method=%s)", job.name, cfg["method"]["name"])
    seat.begin_span()  # the timed part: pruning and inference speed
    result = prune_from_config(model, calib_ids, cfg, None if dev is None else dev[0])  # select + repair
    log.info("%s removed layers %s in %.1f s", job.name, result.removed_layers, result.timings["prune_s"])
    inject_fault(job.name, model)  # tests only
    check_forward_finite(model, calib_ids[:1])

    t = time.perf_counter()
    if (cfg.get("speed") or {}).get("enabled"):
        log.info("%s: measuring inference speed (prefill + cached decode, speed.*)", job.name)
    speed = measure_from_config(model, cfg.get("speed"))  # inference speed
    seat.end_span()
    phases["speed_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg["eval"].get("tasks") or cfg["eval"].get("ppl"):
        log.info("%s: evaluating (eval=%s)", job.name, cfg["eval"].get("name"))
    items = job.dir / ITEMS_FILE if cfg.get("save_items", True) else None  # per-item records, gradmap/eval/items.py
    metrics = evaluate(model, tokenizer, cfg["eval"], device, lambda out: keep_lm_eval(out, job, tracker), items)
    lm_eval = {"lm_eval": metrics.pop("lm_eval")} if "lm_eval" in metrics else {}  # versions, configs, n-shot
    phases["eval_s"] = time.perf_counter() - t

    out = record(cfg, job, result, metrics, phases, status="ok", speed=speed) | lm_eval  # record
    out.update(dev_fields(model, dev))  # dev NLL of the final model (untimed)
    out["placement"] = seat.close()  # launcher, device, and which other jobs ran on it during the timed span
    if cfg.get("save_model") or (cfg.get("tracker") or {}).get("log_model"):
        folder = save_pruned_model(model, tokenizer, model_folder(cfg, job.dir), out, cfg)
        out["saved_model"] = str(folder)
        if cfg.get("push_to_hub"):
            out["pushed_to"] = push_to_hub(folder, str(cfg["push_to_hub"]))
    return out


def keep_lm_eval(output: dict[str, Any], job: Job, tracker: Tracker) -> None:
    """lm-eval's own records: its results JSON into ``<job>/lm_eval/``, and its WandbLogger tables via the tracker.

    Neither may fail the job: the metrics are already computed, and losing them to a logger would be the wrong
    trade (the warning says what was not kept).
    """
    try:
        save_results_json(output, job.dir / "lm_eval")
    except Exception as err:
        log.warning("lm-eval results record not saved: %s", one_line_error(err))
    try:
        tracker.log_lm_eval(output)
    except Exception as err:
        log.warning("lm-eval W&B tables not logged: %s", one_line_error(err))


@torch.inference_mode()
def check_forward_finite(model, input_ids: torch.Tensor) -> None:
    """Stop the job if the pruned model computes NaN/inf, naming the first layer whose output goes bad.

    One forward on one calibration window: cheap, and it turns an fp16 overflow into a clear error instead of a
    table of chance-level accuracies and a NaN perplexity.
    """
    bad: list[int] = []
    handles = [
        layer.register_forward_hook(
            lambda mod, args, out, i=i: (
                bad.append(i)
                if not bad and not torch.isfinite(out[0] if isinstance(out, tuple) else out).all()
                else None
            )
        )
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        logits = model(input_ids=input_ids.to(model_device(model)), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    if bad or not torch.isfinite(logits).all():
        where = f"the output of (pruned) layer {bad[0]}" if bad else "the logits"
        dtype = next(model.parameters()).dtype
        advice = (
            "the weights or the repair produced non-finite values, not the precision; check the repair info"
            if dtype == torch.float32
            else "try dtype=float32 (or bfloat16 instead of float16)"
        )
        raise NonFiniteError(
            f"the pruned model computes NaN/inf in {where} (dtype {str(dtype).removeprefix('torch.')}); {advice}"
        )


def record(
    cfg: Mapping[str, Any],
    job: Job,
    result: PruneResult | None,
    metrics: Mapping[str, Any],
    phases: Mapping[str, float],
    status: str,
    error: str | None = None,
    speed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The result.json layout: flat facts first, then details for reports, then the resolved config."""
    out: dict[str, Any] = {
        "status": status,
        "job_id": job.job_id,
        "job_name": job.name,
        "sweep": str(cfg["sweep"]),
        "model": cfg["model"]["name"],
        "method": cfg["method"]["name"],
    }
    if error is not None:
        out["error"] = error
    if result is not None:
        out.update(
            {
                "selector": result.selector,
                "repair": result.repair,
                "n_layers": result.n_layers,
                "n_remove": result.n_remove,
                "ratio": result.n_remove / result.n_layers,
                "removed_layers": result.removed_layers,
                "removed_units": result.removed_units,  # branches: 2 per removed layer + 1 per partial layer
                "partial_layers": {str(k): v for k, v in result.partial_layers.items()},
                "params_before": result.params_before,
                "params_after": result.params_after,
                "timing": {  # per-phase peaks stay out; repeats (timing.repeats > 1) come with every run's time
                    k: v
                    for k, v in result.timings.items()
                    if k not in ("select_peak_mem_bytes", "repair_peak_mem_bytes")
                }
                | dict(phases),
                "metrics": dict(metrics),
                "scores": [{str(k): v for k, v in step.items()} for step in result.scores],
                "selector_options": result.selector_options,
                "repair_options": result.repair_options,
                "selector_info": result.selector_info,
                "repair_info": {
                    k: ({str(i): s for i, s in v.items()} if isinstance(v, dict) else v)
                    for k, v in result.repair_info.items()
                },
            }
        )
    if speed is not None:
        out["speed"] = dict(speed)
    out.update(
        {
            "calib_source": cfg["calib"]["name"],
            "seed": cfg["seed"],
            "versions": versions(),
            "host": socket.gethostname(),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": dict(cfg),
        }
    )
    return out


MIN_FREE_BYTES = 200 * 2**20


def check_writable(folder: Path) -> None:
    """Fail before any model work if the job folder cannot take a result (read-only, or disk nearly full)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / ".write-test", "ok")
    (folder / ".write-test").unlink()
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise OSError(f"only {free / 2**20:.0f} MiB free on its disk (need {MIN_FREE_BYTES // 2**20} MiB)")


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check every value that can be checked without the model (gradmap/config.py), so a bad override fails in
    milliseconds, before any folder is created; then the device, placement, eval tasks and what needs the network."""
    from gradmap.eval.harness import check_eval_config

    validate(cfg)
    device = resolve_device(cfg["device"])
    tasks, source = check_eval_config(cfg["eval"])
    placement_kwargs(dict(cfg["model"]), device)
    if source == "online" and tasks:
        names = ", ".join(repr(t) for t in tasks)
        check_online_reachable(f"eval=online (tasks {names})", "; offline, use eval=quick, full or smoke")
    resolve_mode((cfg.get("tracker") or {}).get("mode"))
    if cfg.get("push_to_hub"):
        if not (cfg.get("save_model") or (cfg.get("tracker") or {}).get("log_model")):
            raise ValueError(f"push_to_hub={cfg['push_to_hub']!r} needs save_model=true")
        check_online_reachable(f"push_to_hub={cfg['push_to_hub']!r}")


def one_line_error(err: BaseException) -> str:
    """``Type: first line`` of an exception, with advice for the failures researchers hit most."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if getattr(err, "one_line", None):  # an error that already says what to change (e.g. EvalOutOfMemory)
        return str(err.one_line)
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return (
            "CUDA out of memory; lower prune.micro_batch_size (windows per forward), set "
            "method.options.grad_checkpointing=true, or shorten calib.seq_len"
        )
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def execute(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run one job end to end; never raise for a job failure. Returns the record that was written.

    Order matters: the config is validated before anything is created; a valid ok record is kept unless ``force``;
    the folder is claimed so a second process skips it; the new record replaces the old one only when complete.
    """
    try:
        validate_config(cfg)
        cfg = with_model_bos(cfg)  # before the job id: a BOS-requiring model's windows all start with BOS
    except ValueError as err:
        message = one_line_error(err)
        log.error("invalid config, nothing run or written: %s", message)
        return {"status": "failed", "job_name": "(invalid config)", "job_id": None, "error": message}
    job = Job.from_config(cfg)
    done = check_record(job.dir)
    if done.status == "ok" and not cfg.get("force", False):
        log.info("skip %s: finished result in %s", job.name, done.path)
        return {**(done.record or {}), "skipped": True}
    if done.status == "corrupt":
        log.warning("recompute %s: %s is corrupt (%s)", job.name, done.path, done.problem)
    try:
        check_writable(job.dir)
    except OSError as err:  # nowhere to record anything: say so before any model work
        message = f"runs_dir {str(cfg['runs_dir'])!r} is not usable: {err}"
        log.error("%s failed: %s", job.name, message)
        return {"status": "failed", "job_name": job.name, "job_id": job.job_id, "error": message}
    reused = reuse_dense(cfg, job.job_id, job.name, job.dir)  # method=none: a finished twin in any sweep
    if reused is not None:
        return reused
    claim = JobClaim(job.dir)
    holder = claim.acquire()
    if holder is not None:
        message = f"{holder} is computing this job now ({claim.path}); skipped here so it is not computed twice"
        log.warning("skip %s: %s", job.name, message)
        return {"status": "busy", "job_name": job.name, "job_id": job.job_id, "error": message}
    try:
        done = check_record(job.dir)  # a twin may have finished between the first look and the claim
        if done.status == "ok" and not cfg.get("force", False):
            log.info("skip %s: finished result in %s", job.name, done.path)
            return {**(done.record or {}), "skipped": True}
        return _run_claimed(cfg, job)
    finally:
        claim.release()


def _run_claimed(cfg: Mapping[str, Any], job: Job) -> dict[str, Any]:
    """The job itself, its folder claimed: log to job.log, run, write the record atomically, close the tracker."""
    log.info("start %s: folder %s, device %s, dtype %s", job.name, job.dir, device_label(cfg), job.identity["dtype"])
    handler = logging.FileHandler(job.dir / "job.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    tracker: Tracker = Tracker()
    exit_code = 1
    try:
        tracker = make_tracker(cfg, job.job_id, job.name, job.dir)
        out = run_job(cfg, job, tracker)
        exit_code = 0
    except Exception as err:  # one job's failure must not take down the sweep
        message = one_line_error(err)
        atomic_write_text(job.dir / "error.log", traceback.format_exc())
        log.error("%s failed: %s (traceback: %s)", job.name, message, job.dir / "error.log")
        out = record(cfg, job, None, {}, {}, status="failed", error=message)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    atomic_write_json(job.dir / RESULT_FILE, out)  # replaces an older record only now, complete
    if out["status"] == "ok":
        (job.dir / "error.log").unlink(missing_ok=True)  # a failed earlier attempt's traceback is stale now
    try:
        tracker.log_job(out, job.dir)
        if out.get("saved_model") and (cfg.get("tracker") or {}).get("log_model"):
            tracker.log_model(Path(out["saved_model"]), artifact_name(out, "model"))
    except Exception as err:  # tracking never fails a finished job
        log.warning("W&B logging of %s incomplete: %s", job.name, one_line_error(err))
    finally:
        tracker.finish(exit_code)
    return out
