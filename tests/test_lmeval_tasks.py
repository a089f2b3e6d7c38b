"""Online task names and lm-eval's generic result layout (groups, filters, directions), on synthetic output."""

from __future__ import annotations

import pytest

from gradmap.eval.harness import check_eval_config, primary_results
from gradmap.eval.lmeval_tasks import default_metric_map, task_metrics

# The shape simple_evaluate returns for a group (mmlu), a generative task with filters (gsm8k) and a task whose
# first metric is lower-is-better (lambada_openai).
OUT = {
    "results": {
        "mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": 0.01},
        "mmlu_anatomy": {"acc,none": 0.25, "acc_stderr,none": 0.04},
        "mmlu_astronomy": {"acc,none": 0.35, "acc_stderr,none": 0.04},
        "gsm8k": {
            "exact_match,strict-match": 0.05,
            "exact_match_stderr,strict-match": 0.006,
            "exact_match,flexible-extract": 0.07,
            "exact_match_stderr,flexible-extract": "N/A",
        },
        "lambada_openai": {"perplexity,none": 12.5, "perplexity_stderr,none": 0.4, "acc,none": 0.5},
    },
    "group_subtasks": {"mmlu": ["mmlu_anatomy", "mmlu_astronomy"]},
    "n-samples": {
        "mmlu_anatomy": {"original": 135, "effective": 135},
        "mmlu_astronomy": {"original": 152, "effective": 152},
        "gsm8k": {"original": 1319, "effective": 1319},
        "lambada_openai": {"original": 5153, "effective": 5153},
    },
    "higher_is_better": {"lambada_openai": {"perplexity": False, "acc": True}, "gsm8k": {"exact_match": True}},
}


def test_group_and_filtered_metrics_are_read_generically():
    mmlu = task_metrics(OUT, "mmlu")
    assert mmlu == {"acc": 0.3, "acc_stderr": 0.01, "n": 287}, "a group's items are its subtasks' items"
    gsm8k = task_metrics(OUT, "gsm8k")
    assert gsm8k["exact_match,strict-match"] == 0.05 and "exact_match_stderr,flexible-extract" not in gsm8k


def test_primary_metrics_map_and_average_over_higher_is_better():
    tasks = ["mmlu", "gsm8k", "lambada_openai"]
    per_task = {t: task_metrics(OUT, t) for t in tasks}
    wanted = default_metric_map(tasks, "online", {"lambada_openai": "perplexity"})
    res = primary_results(OUT, tasks, per_task, wanted)
    assert res["metric_map"] == {"mmlu": "acc", "gsm8k": "exact_match,strict-match", "lambada_openai": "perplexity"}
    assert res["lambada_openai"] == 12.5
    assert res["avg"] == pytest.approx(100 * (0.3 + 0.05) / 2) and res["avg_tasks"] == ["mmlu", "gsm8k"]
    with pytest.raises(ValueError, match=r"task 'mmlu' reports no 'bleu'; reported: acc; set eval.metric_map"):
        primary_results(OUT, ["mmlu"], per_task, {"mmlu": "bleu"})


def test_online_accepts_any_name_offline_only_the_local_seven():
    assert check_eval_config({"name": "o", "tasks": ["mmlu", "gsm8k"], "source": "online"}) == (
        ["mmlu", "gsm8k"],
        "online",
    )
    with pytest.raises(ValueError, match=r"eval task 'gsm8k' needs eval=online and internet"):
        check_eval_config({"name": "q", "tasks": ["piqa", "gsm8k"], "source": "local"})
    with pytest.raises(ValueError, match=r"eval.metric_map\['piqa'\] = 'exact_match'; allowed: acc, acc_norm"):
        check_eval_config({"name": "q", "tasks": ["piqa"], "source": "local", "metric_map": {"piqa": "exact_match"}})


def test_online_mmlu_composes_with_cfg_job():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "run.py", "eval=online", "eval.tasks=[mmlu]", "--cfg", "job"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-1000:]
    assert "source: online" in out.stdout and "- mmlu" in out.stdout
