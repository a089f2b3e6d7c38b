"""Evaluation of an in-memory (pruned or dense) model: lm-eval zero-shot tasks + WikiText-2 perplexity.

One entry point, :func:`evaluate`, driven by a plain mapping (a Hydra ``conf/eval/*.yaml`` preset), returning
a flat ``{metric: number}`` dict that the runner can log and tabulate without knowing lm-eval's result schema.

Design choices and why:

* lm-eval (pinned 0.4.13) scores the tasks on the model object itself (``HFLM(pretrained=model)``), 0-shot, so
  no checkpoint is written and the pruned architecture is evaluated as it is in memory.
* ``source: local`` (default) runs the offline task copies of :mod:`gradmap.eval.tasks` on the files in ``data/``;
  ``source: online`` runs lm-eval's built-in tasks of the same names (needs the HF hub). Both render the same
  prompts (HellaSwag: see data/SOURCES.md).
* ``limit: k`` scores a *seeded* subset of k items per task (``limit`` may also map task → k). The indices
  depend only on ``subset_seed``, the task name and the task size, never on the model, so every method and run
  of a sweep is scored on exactly the same items. lm-eval's own ``limit`` (first k items) is not used: the
  first items of a split are not a fair sample (HellaSwag's first 3243 are all ActivityNet).
* Primary metric per task follows LLM-Pruner / Shortened-LLaMA (docs/protocol.md §6): acc for boolq, piqa,
  winogrande, arc_easy; acc_norm for hellaswag, arc_challenge, openbookqa. ``avg`` is the unweighted mean of
  the primary metrics present, **×100** (paper convention), while per-task values stay fractions in [0, 1].
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradmap.eval.items import task_items, window_items, write_items
from gradmap.eval.lmeval_tasks import check_tasks, default_metric_map, higher_is_better, pick_primary, task_metrics
from gradmap.eval.loops import check_loop, counting_hflm, lean_hflm
from gradmap.eval.perplexity import PPL_DATASETS, load_ppl_text, perplexity, tokenize_corpus
from gradmap.eval.tasks import local_task_configs
from gradmap.eval.templates import templates_compiled_once

log = logging.getLogger(__name__)

SOURCES = ("local", "online")
CFG_KEYS = ("name", "tasks", "limit", "subset_seed", "batch_size", "source", "ppl", "metric_map", "num_fewshot", "loop")
PPL_KEYS = ("window", "stride", "max_windows", "dataset", "add_bos")


def _plain(cfg: Any) -> Any:
    """Deep-convert an OmegaConf/Mapping config to plain dicts/lists (Hydra passes DictConfig)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is optional for library use
        pass
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_plain(v) for v in cfg]
    return cfg


def _check_keys(cfg: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    """A typo in a preset (``limt:``) must fail loudly instead of silently evaluating everything."""
    for key in cfg:
        if key not in allowed:
            raise ValueError(f"unknown key {where}{key}; allowed: {', '.join(allowed)}")


Limit = int | Mapping[str, int | None] | None


def resolve_limits(tasks: Sequence[str], limit: Limit) -> dict[str, int | None]:
    """Items to score per task: None (all), one int for every task, or a task → int|None mapping.

    A mapping must name only selected tasks; tasks it leaves out are scored in full.
    """
    if limit is None or isinstance(limit, int):
        per_task: Mapping[str, int | None] = dict.fromkeys(tasks, limit)
    elif isinstance(limit, Mapping):
        extra = sorted(set(limit) - set(tasks))
        if extra:
            raise ValueError(f"eval.limit names {extra}, which are not in eval.tasks {list(tasks)}")
        per_task = {t: limit.get(t) for t in tasks}
    else:
        raise ValueError(f"eval.limit must be null, an int or a task->int mapping, got {limit!r}")
    for task, k in per_task.items():
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"eval.limit for {task!r} must be a positive int or null, got {k!r}")
    return dict(per_task)


def subset_indices(task: str, n_docs: int, k: int | None, seed: int) -> list[int] | None:
    """Sorted indices of a seeded k-item subset of a task's ``n_docs`` items (None: all items).

    Seeding ``random.Random`` with a string is stable across processes and Python versions (sha512 of the
    string), unlike ``hash()``; including the task name decorrelates the subsets of different tasks.
    """
    if k is None or k >= n_docs:
        return None
    rng = random.Random(f"gradmap-eval-subset/{seed}/{task}")
    return sorted(rng.sample(range(n_docs), k))


def _place(model: torch.nn.Module, device: str | torch.device) -> None:
    """Move the model to ``device`` unless it is there already or sharded by accelerate (hf_device_map)."""
    if getattr(model, "hf_device_map", None):
        return
    device = torch.device(device)
    current = next(model.parameters()).device
    if current.type != device.type or (device.index is not None and current.index != device.index):
        model.to(device)


def _load_tasks(tasks: list[str], source: str) -> tuple[Any, dict[str, Any]]:
    """Build lm-eval Task/Group objects (loading their data) for ``tasks``; returns (task manager, lm-eval's
    ``{"tasks": leaf name → Task, "groups": name → Group}``)."""
    from lm_eval.tasks import TaskManager

    if source == "local":
        manager = TaskManager(include_defaults=False)  # inline configs need no index of the built-in YAMLs
        loaded = manager.load(local_task_configs(tasks))
    else:
        manager = TaskManager()
        loaded = manager.load(tasks)
    return manager, loaded


def _requested(loaded: Mapping[str, Any], name: str) -> Any:
    """The Task or Group object of a requested name (a group is scored through all of its subtasks)."""
    return loaded["tasks"].get(name) or loaded["groups"][name]


def _leaves(loaded: Mapping[str, Any], name: str) -> list[Any]:
    """The leaf Task objects behind a requested name; ``limit`` applies to each of them."""
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["groups"][name].get_all_tasks())


def _set_fewshot(loaded: Mapping[str, Any], tasks: Sequence[str], num_fewshot: Any) -> None:
    """``eval.num_fewshot``: null keeps each task's own default, an int applies to all, a mapping per task."""
    if num_fewshot is None:
        return
    per_task = num_fewshot if isinstance(num_fewshot, Mapping) else dict.fromkeys(tasks, num_fewshot)
    for name, k in per_task.items():
        if name not in tasks or isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"eval.num_fewshot for {name!r} = {k!r}; allowed: a task of eval.tasks, an int >= 0")
        for task in _leaves(loaded, name):
            task.set_config(key="num_fewshot", value=k)


def _run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    cfg: Mapping[str, Any],
    on_output: Callable[[dict[str, Any]], None] | None = None,
    keep_items: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Score ``tasks`` with lm-eval; returns ({task: {metric: value, metric_stderr: se, n: items}}, lm-eval's
    raw output). ``on_output`` gets the raw output first (the pipeline saves it and hands it to the tracker).
    ``keep_items``: ask lm-eval for its per-item records (``log_samples``), for :func:`item_rows`.

    With ``source: online`` the built-in boolq and winogrande YAMLs compute acc only, so their acc_norm keys
    are absent (the local copies add acc_norm, see gradmap/eval/tasks/*.yaml).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager, loaded = _load_tasks(tasks, cfg["source"])
    _set_fewshot(loaded, tasks, cfg.get("num_fewshot"))
    limits = resolve_limits(tasks, cfg.get("limit"))
    seed = int(cfg.get("subset_seed", 0))
    samples = {}
    for name in tasks:
        for task in _leaves(loaded, name):
            idx = subset_indices(task.task_name, len(task.eval_docs), limits[name], seed)
            if idx is not None:
                samples[task.task_name] = idx
    loop = check_loop(cfg.get("loop"))
    hflm = counting_hflm(lean_hflm(HFLM) if loop == "lean" else HFLM)
    lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=resolve_batch_size(cfg.get("batch_size", 1)))
    start = time.perf_counter()
    with templates_compiled_once():
        out = simple_evaluate(
            model=lm,
            tasks=[_requested(loaded, name) for name in tasks],
            task_manager=manager,
            num_fewshot=None,  # tasks without num_fewshot (all 7, local and built-in) run 0-shot
            samples=samples or None,
            log_samples=keep_items,
        )
    seconds = time.perf_counter() - start
    if out is None:  # only non-zero ranks get None; this code runs single-process
        raise RuntimeError("lm-eval returned no results")
    out["throughput"] = {
        "requests": lm.requests,
        "seconds": seconds,
        "requests_per_s": lm.requests / seconds if seconds > 0 else None,
        "batch_size": cfg.get("batch_size", 1),
        "loop": loop,
    }
    if on_output is not None:
        on_output(out)
    return {name: task_metrics(out, name) for name in tasks}, out


LM_EVAL_BLOCK = ("versions", "n-shot", "higher_is_better", "n-samples", "configs", "lm_eval_version", "throughput")


def lm_eval_block(out: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of lm-eval's output that say what was measured (task versions, configs, n-shot, direction).

    Kept in the result record so a number can be traced to the exact task definition; JSON-safe (configs may hold
    callables, which become their repr).
    """
    import json

    return json.loads(json.dumps({k: out[k] for k in LM_EVAL_BLOCK if k in out}, default=str))


def item_rows(out: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Compact per-item rows (gradmap.eval.items) of every leaf task in lm-eval's ``samples``."""
    samples = out.get("samples") or {}
    return [row for name in sorted(samples) for row in task_items(name, samples[name])]


def _run_ppl(
    model: torch.nn.Module, tokenizer: Any, ppl_cfg: Mapping, device: torch.device
) -> tuple[dict, list[dict[str, Any]]]:
    """WikiText-2 perplexity with the preset's window/stride/max_windows: the flat metric + metadata keys, and
    one item row per window (summed NLL, scored tokens)."""
    _check_keys(ppl_cfg, PPL_KEYS, "eval.ppl.")
    dataset = ppl_cfg.get("dataset", "wikitext2")
    if dataset not in PPL_DATASETS:
        raise ValueError(f"unknown eval.ppl.dataset {dataset!r}; allowed: {', '.join(PPL_DATASETS)}")
    window = int(ppl_cfg.get("window", 2048))
    bos = None
    if ppl_cfg.get("add_bos", False):
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError("eval.ppl.add_bos is true but the tokenizer has no bos_token_id")
    ids = tokenize_corpus(load_ppl_text(dataset), tokenizer)
    res = perplexity(
        model,
        ids,
        window=window,
        stride=ppl_cfg.get("stride"),
        max_windows=ppl_cfg.get("max_windows"),
        bos_token_id=bos,
        device=device,
    )
    flat = {
        f"{dataset}_ppl": res.ppl,
        "ppl_window": res.window,
        "ppl_stride": res.stride,
        "ppl_tokens": res.tokens,
        "ppl_windows": res.windows,
        "ppl_add_bos": bos is not None,
    }
    return flat, window_items(dataset, res.window_nll, res.window_tokens)


def resolve_batch_size(value: Any) -> int | str:
    """``eval.batch_size``: a whole number >= 1, or lm-eval's own ``auto`` / ``auto:N`` (largest size that fits,
    re-detected N times over the run)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        if value == "auto" or (value.startswith("auto:") and value[5:].isdigit() and int(value[5:]) >= 1):
            return value
        if value.isdigit() and int(value) >= 1:
            return int(value)
    raise ValueError(f"eval.batch_size={value!r} is not allowed; allowed: a whole number >= 1, auto, auto:N")


def _check_ppl_config(ppl_cfg: Any) -> None:
    """The ``eval.ppl`` block's keys, dataset and sizes (whole numbers), before any model work."""
    if not isinstance(ppl_cfg, dict):
        raise ValueError(f"eval.ppl must be a mapping or null, got {ppl_cfg!r}")
    _check_keys(ppl_cfg, PPL_KEYS, "eval.ppl.")
    dataset = ppl_cfg.get("dataset", "wikitext2")
    if dataset not in PPL_DATASETS:
        raise ValueError(f"unknown eval.ppl.dataset {dataset!r}; allowed: {', '.join(PPL_DATASETS)}")
    for key, low, optional in (("window", 2, False), ("stride", 1, True), ("max_windows", 1, True)):
        value = ppl_cfg.get(key, None if optional else 2048)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"eval.ppl.{key}={value!r} must be a whole number >= {low}{' or null' if optional else ''}"
            )
    if not isinstance(ppl_cfg.get("add_bos", False), bool):
        raise ValueError(f"eval.ppl.add_bos={ppl_cfg.get('add_bos')!r} must be true or false")


def check_eval_config(cfg: Mapping[str, Any]) -> tuple[list[str], str]:
    """(tasks, source) of an eval preset, checked without lm-eval or the model, so the pipeline can call it
    before any model work: unknown keys, source, task names (offline: the 7 local tasks only), limits."""
    cfg = _plain(cfg)
    if not isinstance(cfg, dict):
        raise ValueError(f"eval cfg must be a mapping, got {type(cfg).__name__}")
    _check_keys(cfg, CFG_KEYS, "eval.")
    source = cfg.get("source") or "local"
    if source not in SOURCES:
        raise ValueError(f"unknown eval.source {source!r}; allowed: {', '.join(SOURCES)}")
    tasks = check_tasks(cfg.get("tasks") or [], source)
    default_metric_map(tasks, source, cfg.get("metric_map"))
    resolve_limits(tasks, cfg.get("limit"))
    resolve_batch_size(cfg.get("batch_size", 1))
    check_loop(cfg.get("loop"))
    seed = cfg.get("subset_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"eval.subset_seed={seed!r} must be a whole number")
    if cfg.get("ppl"):
        _check_ppl_config(cfg["ppl"])
    return tasks, source


def primary_results(
    out: Mapping[str, Any], tasks: Sequence[str], per_task: Mapping[str, Mapping[str, float]], wanted: Mapping
) -> dict[str, Any]:
    """The flat metrics of the tasks: ``<task>`` (primary), ``<task>/<metric>``, ``metric_map`` and ``avg``.

    ``avg`` is the mean x100 of the primary metrics that lm-eval marks higher-is-better (a perplexity-like
    primary metric would not average with accuracies); ``avg_tasks`` says which tasks it covers.
    """
    results: dict[str, Any] = {}
    chosen = {name: pick_primary(out, name, per_task[name], wanted.get(name)) for name in tasks}
    for name in tasks:
        results[name] = per_task[name][chosen[name]]
    averaged = [name for name in tasks if higher_is_better(out, name, chosen[name])]
    if averaged:
        results["avg"] = 100.0 * sum(results[name] for name in averaged) / len(averaged)
    if averaged != list(tasks):
        results["avg_tasks"] = averaged
    results["metric_map"] = chosen
    for name in tasks:
        for key, value in per_task[name].items():
            results[f"{name}/{key}"] = value
    return results


def release_cached(device: torch.device) -> None:
    """Give the allocator's free blocks back: on a shared GPU one job's reserved memory fails another's allocation."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class EvalOutOfMemory(RuntimeError):
    """The GPU ran out of memory in evaluation, not in pruning; ``one_line`` says which settings to change (on one
    H200 shared by 15 jobs, lm-eval's logits over Gemma 3's 262k vocabulary took 38 GiB for one batch of 16)."""

    def __init__(self, batch_size: Any) -> None:
        self.one_line = (
            f"CUDA out of memory in evaluation at eval.batch_size={batch_size}; lower eval.batch_size "
            "(or eval.batch_size=auto) or run fewer jobs per GPU"
        )
        super().__init__(self.one_line)


def evaluate(
    model: Any,
    tokenizer: Any,
    cfg: Mapping,
    device: str | torch.device = "cpu",
    on_lm_eval: Callable[[dict[str, Any]], None] | None = None,
    items_path: str | Path | None = None,
) -> dict:
    """Evaluate ``model`` as configured by ``cfg`` (an ``eval`` preset) and return a flat metric dict.

    Keys: ``<task>`` (primary metric, fraction), ``<task>/acc``, ``<task>/acc_norm``, ``<task>/acc_stderr``,
    ``<task>/acc_norm_stderr``, ``<task>/n`` (items scored), ``avg`` (mean of the primary metrics ×100),
    ``wikitext2_ppl`` and metadata ``ppl_window``, ``ppl_stride``, ``ppl_tokens``, ``ppl_windows``,
    ``ppl_add_bos``, ``eval_preset``, ``eval_seconds``. A preset with no tasks and no ``ppl`` (``eval=none``)
    returns ``{}`` without touching the model.

    ``items_path`` (e.g. ``<job>/items.jsonl.gz``): also keep every item's outcome and every PPL window's NLL
    there (:mod:`gradmap.eval.items`) and add ``items_file`` (its name) and ``items_n`` (rows) to the result.
    With tasks, the result also holds ``lm_eval``: lm-eval's task versions, configs, n-shot and
    higher_is_better (:func:`lm_eval_block`), and ``throughput`` ({requests, seconds, requests_per_s, batch_size}
    of the lm-eval run, perplexity excluded), for the caller to keep in its record.

    The model is moved to ``device`` (unless sharded), evaluated in eval mode, and its train/eval mode
    restored afterwards, so a pruning pipeline that keeps the model in train mode (gradient checkpointing) is
    unaffected.
    """
    cfg = _plain(cfg)
    tasks, source = check_eval_config(cfg)
    ppl_cfg = cfg.get("ppl")
    if not tasks and not ppl_cfg:
        return {}
    wanted = default_metric_map(tasks, source, cfg.get("metric_map"))
    if source == "local":
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    device = torch.device(device)
    was_training = model.training
    start = time.perf_counter()
    results: dict[str, Any] = {}
    items: list[dict[str, Any]] = []
    try:
        _place(model, device)
        model.eval()
        release_cached(device)  # pruning's cached blocks go back to the GPU, for the jobs sharing it
        if tasks:
            keep = items_path is not None
            per_task, out = _run_lm_eval(model, tokenizer, tasks, cfg, on_lm_eval, keep_items=keep)
            results.update(primary_results(out, tasks, per_task, wanted))
            results["lm_eval"] = lm_eval_block(out)
            items += item_rows(out) if keep else []
        if ppl_cfg:
            release_cached(device)  # lm-eval's largest logits are not needed for the perplexity windows
            flat, windows = _run_ppl(model, tokenizer, ppl_cfg, device)
            results.update(flat)
            items += windows
    except torch.cuda.OutOfMemoryError as err:  # the pruning advice would mislead here: the batch is eval's
        raise EvalOutOfMemory(cfg.get("batch_size")) from err
    finally:
        model.train(was_training)
    if items_path is not None:
        results["items_n"] = write_items(items_path, items)
        results["items_file"] = Path(items_path).name
    results["eval_preset"] = cfg.get("name")
    results["eval_seconds"] = time.perf_counter() - start
    log.info(
        "eval %s: %s", cfg.get("name"), {k: v for k, v in results.items() if "/" not in k and not isinstance(v, dict)}
    )
    return results
