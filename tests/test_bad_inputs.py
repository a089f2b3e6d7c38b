"""The bad-input list of docs/reliability.md: each kind fails on the default model before the model is loaded,
in well under 30 s, with one line naming the key or file. ``python tests/test_bad_inputs.py`` prints the table.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradmap import pipeline
from gradmap.overrides import check_overrides

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=smollm2_135m", "tracker=none"]

# (what is wrong, overrides, text the one-line error must contain: the key or file it names)
BAD_INPUTS: list[tuple[str, list[str], str]] = [
    ("seed not a number", ["seed=abc"], "seed='abc' is not a whole number"),
    ("seed a fraction", ["seed=1.5"], "seed=1.5 is not a whole number"),
    ("seed negative", ["seed=-1"], "seed=-1 is out of range"),
    ("seed a boolean", ["seed=true"], "seed=True is not a whole number"),
    ("misspelt prune key", ["+prune.ratoi=0.5"], "unknown key prune.ratoi (did you mean prune.ratio?)"),
    ("ratio above 1", ["prune.ratio=1.5"], "prune.ratio=1.5 is out of range; allowed: 0 < prune.ratio < 1"),
    ("ratio 0", ["prune.ratio=0"], "prune.ratio=0 is out of range"),
    ("ratio not a number", ["prune.ratio=abc"], "prune.ratio='abc' is not a number"),
    ("ratio and n_remove", ["prune.ratio=0.25", "prune.n_remove=2"], "give prune.ratio or prune.n_remove, not both"),
    ("n_remove 0", ["prune.n_remove=0"], "prune.n_remove=0 is out of range"),
    ("n_remove = all layers", ["prune.n_remove=30"], "prune.n_remove=30 is too large: the model has 30 layers"),
    ("n_remove a fraction", ["prune.n_remove=2.5"], "prune.n_remove=2.5 is not a whole number"),
    ("ratio rounds to 0 layers", ["prune.ratio=0.01"], "prune.ratio=0.01 of 30 layers rounds to 0 layers"),
    ("protect_first negative", ["prune.protect_first=-1"], "prune.protect_first=-1 is out of range"),
    ("protect_last not a number", ["prune.protect_last=abc"], "prune.protect_last='abc' is not a whole number"),
    (
        "protection leaves too few layers",
        ["prune.protect_first=20", "prune.protect_last=8"],
        "prune.n_remove=8 is too large: the model has 30 layers, 28 protected",
    ),
    ("micro_batch_size 0", ["prune.micro_batch_size=0"], "prune.micro_batch_size=0 is out of range"),
    ("speed.enabled not a boolean", ["speed.enabled=abc"], "speed.enabled='abc' is not a boolean"),
    ("speed prompt 0 tokens", ["speed.prompt_len=0"], "speed.prompt_len=0 is out of range"),
    ("speed repeats negative", ["speed.repeats=-1"], "speed.repeats=-1 is out of range"),
    ("speed time floor negative", ["speed.min_time_s=-1"], "speed.min_time_s=-1 is out of range"),
    ("speed batch 0", ["speed.batch_size=0"], "speed.batch_size=0 is out of range"),
    ("misspelt speed key", ["+speed.warmpu=1"], "unknown key speed.warmpu (did you mean speed.warmup?)"),
    ("eval batch 0", ["eval.batch_size=0"], "eval.batch_size=0 is out of range"),
    ("unknown task", ["eval.tasks=[foo]"], "eval task 'foo' needs eval=online"),
    ("task listed twice", ["eval.tasks=[piqa,piqa]"], "eval tasks listed twice"),
    ("negative item limit", ["eval.limit=-3"], "eval.limit for 'boolq' must be a positive int or null, got -3"),
    (
        "limit for a task not run",
        ["eval=full", "eval.tasks=[piqa]", "eval.limit={boolq:3}"],
        "eval.limit names ['boolq']",
    ),
    ("unknown eval source", ["eval.source=web"], "eval.source='web' is not allowed"),
    ("unknown metric map", ["eval.metric_map=f1"], "eval.metric_map['boolq'] = 'f1'; allowed: acc, acc_norm"),
    ("perplexity window 1", ["eval.ppl.window=1"], "eval.ppl.window=1 is out of range"),
    ("stride above window", ["eval.ppl.stride=4096"], "eval.ppl.stride=4096 is out of range"),
    ("max_windows 0", ["eval.ppl.max_windows=0"], "eval.ppl.max_windows=0 is out of range"),
    ("misspelt eval key", ["+eval.limt=5"], "unknown key eval.limt (did you mean eval.limit?)"),
    ("subset seed not a number", ["eval.subset_seed=x"], "eval.subset_seed='x' is not a whole number"),
    ("no calibration windows", ["calib.n_samples=0"], "calib.n_samples=0 is out of range"),
    ("calibration larger than its text", ["calib.n_samples=100000"], "calib.n_samples x calib.seq_len = 100000 x 256"),
    ("calibration window of 1 token", ["calib.seq_len=1"], "calib.seq_len=1 is out of range"),
    ("calibration file missing", ["calib.path=data/nope.txt"], "calib.path='data/nope.txt': file"),
    ("unknown calibration source", ["calib.source=s3"], "calib.source='s3' is not allowed"),
    ("calib.add_bos not a boolean", ["calib.add_bos=maybe"], "calib.add_bos='maybe' is not a boolean"),
    ("unknown speed protocol", ["+calib.protocol=naitve"], "calib.protocol='naitve' is not allowed"),
    ("sweep climbs out of runs_dir", ["sweep=../../x"], "sweep='../../x' cannot be a folder name under runs_dir"),
    ("sweep an absolute path", ["sweep=/abs/path"], "sweep='/abs/path' cannot be a folder name"),
    ("sweep '..'", ["sweep=.."], "sweep='..' cannot be a folder name"),
    ("model name climbs out", ["model.name=../../x"], "model.name='../../x' cannot be a folder name"),
    ("unknown device", ["device=gpu"], "device='gpu' is not a device"),
    ("unknown dtype", ["dtype=float8"], "dtype='float8' is not allowed"),
    ("method option out of its choices", ["method.options.grad_norm=l3"], "grad_norm='l3' is not allowed"),
    ("unknown method option", ["+method.options.foo=1"], "unknown key method.options.foo"),
    ("method option out of range", ["method.options.layers_per_step=0"], "layers_per_step must be >= 1, got 0"),
    ("method option wrong type", ["method.options.include_norms=yes"], "method.options.include_norms='yes' is not a"),
    ("protect option negative", ["method=sleb", "method.options.protect_first=-2"], "method.options.protect_first=-2"),
    (
        "repair option out of range",
        ["repair=projection", "repair.options.lambda_rel=-1"],
        "repair.options: repair 'projection': lambda_rel",
    ),
    ("repair option choice", ["repair=projection", "repair.options.site=middle"], "site='middle' is not allowed"),
    ("repair for the dense model", ["method=none", "repair=projection"], "method 'none' removes nothing"),
    (
        "trust_remote_code a string",
        ["model=llama2_7b", "model.trust_remote_code='false'"],
        "model.trust_remote_code='false' is not a boolean",
    ),
    ("hub model without hub_id", ["model=llama2_7b", "model.hub_id=null"], "model.hub_id is missing"),
    ("unknown model source", ["model.source=ftp"], "model.source='ftp' is not allowed"),
    (
        "tiny model heads do not divide",
        ["model=tiny_llama", "model.config.hidden_size=65"],
        "hidden_size divisible by heads",
    ),
    ("tracker mode unknown", ["tracker=wandb", "tracker.mode=sometimes"], "tracker.mode='sometimes' is not allowed"),
    ("force not a boolean", ["force=maybe"], "force='maybe' is not a boolean"),
    ("save_model a number", ["save_model=1"], "save_model=1 is not a boolean"),
    ("reuse_dense not a boolean", ["reuse_dense=abc"], "reuse_dense='abc' is not a boolean"),
]


def config(runs: Path, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*BASE, f"runs_dir={runs}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def no_model(monkeypatch):
    """Any call that would load a model fails the test."""
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(pipeline, "run_job", lambda *a, **k: pytest.fail("the job started"))


def test_the_list_has_at_least_40_kinds():
    assert len({what for what, _, _ in BAD_INPUTS}) >= 40


@pytest.mark.parametrize("what, overrides, expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_before_the_model_with_one_line(tmp_path, no_model, what, overrides, expected):
    start = time.perf_counter()
    out = pipeline.execute(config(tmp_path / "runs", overrides))
    assert time.perf_counter() - start < 30
    assert out["status"] == "failed" and expected in out["error"] and "\n" not in out["error"], out["error"]
    assert not (tmp_path / "runs").exists(), "nothing is written for an invalid config"


def test_cut_down_data_file_is_refused(tmp_path, no_model, monkeypatch):
    from gradmap import paths
    from gradmap.eval import perplexity

    real = perplexity.WIKITEXT2_TEST
    cut = tmp_path / "wiki.test.raw.reconstructed"
    cut.write_bytes(real.read_bytes()[:100_000])
    monkeypatch.setattr(perplexity, "WIKITEXT2_TEST", cut)
    expected = paths.shipped_hashes()[real.resolve()]
    monkeypatch.setattr(paths, "shipped_hashes", lambda: {cut.resolve(): expected})
    out = pipeline.execute(config(tmp_path / "runs", []))
    assert out["status"] == "failed" and f"eval.ppl: data file '{cut}' is not the shipped one" in out["error"]


def test_runs_dir_that_is_a_file(tmp_path, no_model):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    out = pipeline.execute(config(blocked, []))
    assert out["status"] == "failed" and f"runs_dir='{blocked}' is a file" in out["error"]


@pytest.mark.parametrize(
    "arg, expected",
    [("method=shortgtp", "unknown method 'shortgtp'. Did you mean 'shortgpt'?"), ("model=llama9", "unknown model")],
)
def test_unknown_group_values_fail_before_hydra(arg, expected):
    with pytest.raises(ValueError, match=expected.replace("?", r"\?").replace(".", r"\.")):
        check_overrides([arg])


if __name__ == "__main__":  # the table in docs/reliability.md
    import tempfile

    print("| # | bad input | override | one-line error |\n|---|---|---|---|")
    for i, (what, overrides, _) in enumerate(BAD_INPUTS, 1):
        with tempfile.TemporaryDirectory() as tmp:
            error = pipeline.execute(config(Path(tmp) / "runs", overrides))["error"]
        print(f"| {i} | {what} | `{' '.join(overrides)}` | {error.replace('|', '/')} |")
