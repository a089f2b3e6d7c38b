"""The bench's numbers and text: merging parts, ratios and targets, and the Markdown report."""

from __future__ import annotations

import math
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from gradmap.bench.config import DEFAULT_SPEEDUP_SET, GIB, SCHEMA, BenchConfig


def merge_results(parts: Sequence[dict[str, Any]], argv: Sequence[str] = ()) -> dict[str, Any]:
    """One table from several runs of the same setup on the same device model.

    The floor comes from the part that measured the forward+backward; every part's own C_F is kept in ``parts``
    (a check that the machines agree). A row measured twice is taken from the later part.
    """
    if not parts:
        raise ValueError("--merge needs at least one JSON file")
    base = parts[0]
    setup = BenchConfig(**_config_fields(base["config"])).setup()
    for part in parts[1:]:
        other = BenchConfig(**_config_fields(part["config"])).setup()
        if other != setup:
            diff = sorted(k for k in setup if setup[k] != other.get(k))
            raise ValueError(f"cannot merge runs of different setups (differ in: {', '.join(diff)})")
        if part["meta"]["device"] != base["meta"]["device"]:
            raise ValueError(
                f"cannot merge runs on different devices: {base['meta']['device']!r} vs {part['meta']['device']!r}"
            )
    with_fb = [p for p in parts if "forward_backward" in p["floor"]]
    floor_part = with_fb[0] if with_fb else base
    rows: dict[str, dict[str, Any]] = {}
    for part in parts:
        for row in part["rows"]:
            rows[row["label"]] = row
    merged = {
        "schema": SCHEMA,
        "meta": {
            **floor_part["meta"],
            "merged": True,
            "merge_command": "python -m gradmap.bench " + shlex.join(argv) if argv else None,
        },
        "config": {**floor_part["config"], "methods": sorted({m for p in parts for m in p["config"]["methods"]})},
        "model": floor_part["model"],
        "floor": floor_part["floor"],
        "rows": list(rows.values()),
        "errors": {
            k: v for p in parts for k, v in p.get("errors", {}).items() if k not in {r["entry"] for r in rows.values()}
        },
        "parts": [q for p in parts for q in p.get("parts", [])],
    }
    merged["summary"] = summarize(merged)
    return merged


def _config_fields(raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(BenchConfig)}
    out = {k: v for k, v in raw.items() if k in names}
    for key in ("speedup_baselines", "methods"):
        if key in out:
            out[key] = tuple(out[key])
    return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios, targets and the speedup, all computed from the measured rows and floor."""
    floor = result["floor"]
    t_f = floor["forward"]["seconds"]
    fb = floor.get("forward_backward")
    t_fb = fb["seconds"] if fb else None
    cfg = result["config"]
    rows = {row["entry"]: row for row in result["rows"]}
    gradmap = rows.get("gradmap")
    t_gm = gradmap["total_s"] if gradmap else None
    per_row = {}
    for row in result["rows"]:
        floor_s = None
        passes = row.get("floor_passes") or {}
        if passes and (t_fb is not None or "fb" not in passes):
            floor_s = passes.get("f", 0.0) * t_f + passes.get("fb", 0.0) * (t_fb or 0.0)
        per_row[row["label"]] = {
            "ratio_to_gradmap": row["total_s"] / t_gm if t_gm else None,
            "total_in_c_f": row["total_s"] / t_f,
            "select_floor_s": floor_s,
            "select_ratio_to_floor": row["select_s"] / floor_s if floor_s else None,
        }
    summary: dict[str, Any] = {"c_f_s": t_f, "c_fb_s": t_fb, "rows": per_row}
    if gradmap:
        summary["targets"] = gradmap_targets(
            gradmap,
            floor,
            result["model"]["n_layers"],
            result["meta"].get("peak_mem_kind") == "cuda_max_memory_allocated",
        )
        speed = {}
        for name in cfg.get("speedup_baselines", DEFAULT_SPEEDUP_SET):
            if name in rows:
                speed[name] = rows[name]["total_s"] / t_gm
        missing = [n for n in cfg.get("speedup_baselines", DEFAULT_SPEEDUP_SET) if n not in rows]
        summary["speedup"] = {
            "set": list(cfg.get("speedup_baselines", DEFAULT_SPEEDUP_SET)),
            "missing": missing,
            "per_baseline": speed,
            "arithmetic_mean": statistics.fmean(speed.values()) if speed and not missing else None,
            "geometric_mean": math.exp(statistics.fmean(math.log(v) for v in speed.values()))
            if speed and not missing
            else None,
        }
    return summary


def gradmap_targets(
    row: dict[str, Any], floor: dict[str, Any], n_layers: int, span_memory: bool = True
) -> dict[str, Any]:
    """The three GradMAP targets of the issue, with what each is measured against and where the time goes.

    The memory target needs a peak measured over the span alone (CUDA's allocator); a process's peak RSS
    (``span_memory=False``, CPU) includes everything before it, so no memory ratio is claimed there.
    """
    t_f = floor["forward"]["seconds"]
    fb = floor.get("forward_backward")
    steps = row["info"]["selector"].get("step_s", [])
    out: dict[str, Any] = {}
    if fb:
        t_fb = fb["seconds"]
        passes = row["floor_passes"]["fb"]
        out["stage1"] = {
            "seconds": row["select_s"],
            "floor_passes_fb": passes,
            "floor_s": passes * t_fb,
            "ratio_to_floor": row["select_s"] / (passes * t_fb),
            "target": 1.15,
        }
        out["stage1"]["met"] = out["stage1"]["ratio_to_floor"] <= 1.15
        # One layer leaves per decision (layers_per_step=1), so decision i runs a model of L−i layers.
        out["stage1"]["per_decision"] = [
            {
                "alive": n_layers - i,
                "seconds": s,
                "floor_s": (n_layers - i) / n_layers * t_fb,
                "ratio": s / ((n_layers - i) / n_layers * t_fb),
            }
            for i, s in enumerate(steps)
        ]
    if fb and span_memory:
        ref = fb["peak_mem_bytes"]
        out["memory"] = {
            "peak_bytes": row["peak_mem_bytes"],
            "reference_bytes": ref,
            "weights_bytes": floor["weights_bytes"],
            "activations_bytes": ref - floor["weights_bytes"],
            "ratio": row["peak_mem_bytes"] / ref,
            "target": 1.3,
            "met": row["peak_mem_bytes"] / ref < 1.3,
            "reference": "peak of the floor forward+backward: weights + one micro-batch's activations",
        }
    out["stage2"] = {
        "seconds": row["repair_s"],
        "forward_s": t_f,
        "ratio_to_forward": row["repair_s"] / t_f,
        "target": 2.0,
        "met": row["repair_s"] / t_f <= 2.0,
        "pass_s": row["info"]["repair"].get("pass_s"),
        "layer_forwards_per_microbatch": row["info"]["repair"].get("layer_forwards"),
        "site": row["info"]["repair"].get("site"),
        "removed": row["removed"],
    }
    return out


# ---- printing ----------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def format_report(result: dict[str, Any]) -> str:
    """The Markdown table, the floor, the targets and the speedup, as printed and as pasted into the docs."""
    meta, floor, summary = result["meta"], result["floor"], result["summary"]
    mem_note = (
        ""
        if meta.get("peak_mem_kind") == "cuda_max_memory_allocated"
        else " (CPU: process peak RSS, cumulative over the run)"
    )
    lines = [
        f"device: {meta['device']} · torch {meta['torch']} · transformers {meta['transformers']} · {meta['date']}",
        f"setup: {_setup_text(result)}",
        "",
        f"floor: C_F (one dense forward over D) {floor['forward']['seconds']:.3f} s, peak "
        f"{floor['forward']['peak_mem_bytes'] / GIB:.2f} GiB (median of {floor['forward']['repeats']})"
        + (
            ""
            if "forward_backward" not in floor
            else f"; C_FB (forward+backward) {floor['forward_backward']['seconds']:.3f} s = "
            f"{floor['forward_backward']['seconds'] / floor['forward']['seconds']:.2f} C_F, peak "
            f"{floor['forward_backward']['peak_mem_bytes'] / GIB:.2f} GiB (median of "
            f"{floor['forward_backward']['repeats']})"
        )
        + f"; weights {floor['weights_bytes'] / GIB:.2f} GiB",
        "",
        f"| method | select s | repair s | total s | peak GiB{mem_note} | × GradMAP | total / C_F | select / floor "
        "| notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        s = summary["rows"][row["label"]]
        floor_txt = _floor_text(row.get("floor_passes"))
        notes = "; ".join(
            x
            for x in [
                row.get("note", ""),
                f"floor {floor_txt}" if floor_txt else "",
                f"median of {row['repeats']}" if row.get("repeats", 1) > 1 else "",
            ]
            if x
        )
        lines.append(
            f"| {row['label']} | {row['select_s']:.2f} | {row['repair_s']:.2f} | {row['total_s']:.2f} "
            f"| {row['peak_mem_bytes'] / GIB:.2f} | {_fmt(s['ratio_to_gradmap'])} | {s['total_in_c_f']:.2f} "
            f"| {_fmt(s['select_ratio_to_floor'])} | {notes} |"
        )
    targets = summary.get("targets")
    if targets:
        lines += ["", "GradMAP targets:"]
        if "stage1" in targets:
            t1 = targets["stage1"]
            lines.append(
                f"- stage 1 (iterative selection) {t1['seconds']:.2f} s vs floor {t1['floor_passes_fb']:.3f} "
                f"× C_FB = {t1['floor_s']:.2f} s: {t1['ratio_to_floor']:.3f}× (target ≤ 1.15: "
                f"{'met' if t1['met'] else 'NOT met'})"
            )
            per = ", ".join(f"{d['alive']}: {d['ratio']:.3f}" for d in t1["per_decision"])
            lines.append(f"  per decision (layers alive: time / its floor): {per}")
        t2 = targets["stage2"]
        passes = t2.get("pass_s") or {}
        lf = t2.get("layer_forwards_per_microbatch") or {}
        lines.append(
            f"- stage 2 (find layer, fit, merge) {t2['seconds']:.2f} s vs one dense forward "
            f"{t2['forward_s']:.2f} s: {t2['ratio_to_forward']:.2f}× (target ≤ 2: "
            f"{'met' if t2['met'] else 'NOT met'}); shift pass {_fmt(passes.get('shift'))} s "
            f"({lf.get('shift', '–')} layer forwards per micro-batch), fit pass {_fmt(passes.get('fit'))} s "
            f"({lf.get('fit', '–')}), solve + merge + surgery "
            f"{_fmt(t2['seconds'] - sum(passes.values()) if passes else None)} s; site {t2['site']}, "
            f"removed {t2['removed']}"
        )
        if "memory" not in targets:
            lines.append(
                "- peak memory: not assessed here (the CPU's process peak RSS includes everything before the span)"
            )
        else:
            m = targets["memory"]
            lines.append(
                f"- peak memory {m['peak_bytes'] / GIB:.2f} GiB vs weights {m['weights_bytes'] / GIB:.2f} + "
                f"one micro-batch's activations {m['activations_bytes'] / GIB:.2f} = "
                f"{m['reference_bytes'] / GIB:.2f} GiB: {m['ratio']:.2f}× (target < 1.3: "
                f"{'met' if m['met'] else 'NOT met'})"
            )
    speed = summary.get("speedup")
    if speed:
        per = ", ".join(f"{k} {v:.2f}×" for k, v in speed["per_baseline"].items())
        if speed["missing"]:
            lines += [
                "",
                f"speedup (t_b / t_GradMAP) over {speed['set']}: incomplete, missing {speed['missing']}; "
                f"measured: {per}",
            ]
        else:
            lines += [
                "",
                f"speedup (t_b / t_GradMAP, t = select + repair) over {speed['set']}: arithmetic mean "
                f"{speed['arithmetic_mean']:.2f}×, geometric mean {speed['geometric_mean']:.2f}×; "
                f"per baseline: {per}",
            ]
    lines += shared_device_lines(result)
    if result.get("errors"):
        lines += ["", "failed:"] + [f"- {name}: {message}" for name, message in result["errors"].items()]
    commands = [p["command"] for p in result.get("parts", [])]
    lines += ["", "command(s): " + " ; ".join(f"`{c}`" for c in commands)]
    if meta.get("merge_command"):
        lines.append(f"merged with: `{meta['merge_command']}`")
    return "\n".join(lines)


def shared_device_lines(result: dict[str, Any]) -> list[str]:
    """A flag when another gradmap job ran on the bench's device while it timed (every part of a merge counts)."""
    parts = result.get("parts") or [result["meta"]]
    others = sorted({j for p in parts for j in (p.get("placement") or {}).get("same_device_jobs") or []})
    if not others:
        return []
    return [
        "",
        f"**Timing flag:** other jobs ran on this device while the bench timed ({', '.join(others)}; "
        "`placement` in the JSON): these times are not comparable; rerun with the device to itself.",
    ]


def _floor_text(passes: dict[str, float] | None) -> str:
    if not passes:
        return ""
    parts = [f"{v:.3g} C_F" for k, v in passes.items() if k == "f"] + [
        f"{v:.3g} C_FB" for k, v in passes.items() if k == "fb"
    ]
    return " + ".join(parts)


def _setup_text(result: dict[str, Any]) -> str:
    cfg = result["config"]
    model = (
        f"random-init {cfg['arch']}" + (f" {cfg['arch_overrides']}" if cfg.get("arch_overrides") else "")
        if cfg["model"] == "random"
        else cfg["model"]
    )
    return (
        f"{model}, {cfg['dtype']}, calibration {cfg['n_samples']}×{cfg['seq_len']} token ids (seed "
        f"{cfg['seed']}), ratio {cfg['ratio']}, micro-batch {cfg['micro_batch_size']}, gradient checkpointing "
        f"{'on' if cfg['grad_checkpointing'] else 'off'}"
    )
