#!/usr/bin/env python
"""Regenerate ``data/`` (evaluation + WikiText-2 files) from the shared benchmark copies.

Why this exists: the benchmark must run offline and must not read ``../shared`` at run time, so the public
benchmark files are converted once into the *field layout of the HF datasets that lm-eval 0.4.13's built-in
task YAMLs read* and committed under ``data/``. Because the layout matches, the local task YAMLs in
``gradmap/tasks`` can use the built-in ``doc_to_text``/``doc_to_choice``/``process_docs`` unchanged and
render the same prompts item for item.

Every input is checked against the sha256 recorded in ``shared/data/SOURCES.md`` before conversion, every
output is checked for its item count, and ``data/SOURCES.md`` is rewritten with the sha256 of each produced
file. The output is byte-deterministic (gzip with mtime 0, fixed key order), so rerunning the script gives
an empty ``git diff``.

Usage::

    python scripts/convert_data.py --shared ../shared          # or --shared ../shared/data
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# sha256 of the inputs, as recorded in shared/data/SOURCES.md. A mismatch means a different copy of the data.
INPUT_SHA256: dict[str, str] = dict(
    line.split()
    for line in """
boolq/superglue_val.jsonl 21acbfbd1e7908fddd9e626bc2a6101c5a5430bda3fbf74985b979af7a63b989
boolq/dev.jsonl ebc29ea3808c5c611672384b3de56e83349fe38fc1fe876fd29b674d81d0a80a
piqa/valid.jsonl 93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d
piqa/valid-labels.lst b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb
hellaswag/hellaswag_val_full.txt.bz2 50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b
winogrande/dev.jsonl 1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8
winogrande/dev-labels.lst 5ae1e30f52a50b880515685dcfae7d57649cce256d375947cdd02f687de7e6ba
arc_easy/ARC-Easy-Test.jsonl ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be
arc_challenge/ARC-Challenge-Test.jsonl 9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c
openbookqa/test.jsonl feb2bd9bfa6161dca4c44ce90e51e8cdada83eb5061407fcdc5005e44aaf2313
wikitext2/wiki.test.raw.reconstructed 173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08
wikitext2/wiki.valid.tokens f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8
""".splitlines()
    if line
)

# Items per split in lm-eval (docs/protocol.md §6); a different count means a broken conversion.
EXPECTED_ITEMS: dict[str, int] = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}

# Output file of each task, relative to data/. The split name is the one lm-eval evaluates on.
OUTPUT_FILES: dict[str, str] = {
    "boolq": "boolq/validation.jsonl.gz",
    "piqa": "piqa/validation.jsonl.gz",
    "hellaswag": "hellaswag/validation.jsonl.gz",
    "winogrande": "winogrande/validation.jsonl.gz",
    "arc_easy": "arc_easy/test.jsonl.gz",
    "arc_challenge": "arc_challenge/test.jsonl.gz",
    "openbookqa": "openbookqa/test.jsonl.gz",
}
WIKITEXT_FILES = ("wikitext2/wiki.test.raw.reconstructed", "wikitext2/wiki.valid.tokens")

# In the HellaSwag validation split the ActivityNet items come first, WikiHow items after (shared SOURCES.md).
HELLASWAG_N_ACTIVITYNET = 3243


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so large files do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a jsonl file, skipping blank lines."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_labels(path: Path) -> list[int]:
    """Read a one-integer-per-line label file (PIQA / WinoGrande ``*-labels.lst``)."""
    return [int(line) for line in path.read_text(encoding="utf-8").split() if line.strip()]


def write_jsonl_gz(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as gzipped jsonl, deterministically (no file name or mtime in the gzip header).

    Why gzip: the uncompressed files would push data/ past ~15 MB; HF ``datasets``' json loader (which lm-eval
    uses) decompresses ``.gz`` transparently.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    n = 0
    for row in rows:
        buf.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
    ):
        gz.write(buf.getvalue().encode("utf-8"))
    return n


# ---------------------------------------------------------------------------------------------- per dataset


def convert_boolq(src: Path) -> list[dict[str, Any]]:
    """SuperGLUE BoolQ validation → ``aps/super_glue`` boolq layout (question, passage, idx, label int).

    The OpenCompass copy stores ``label`` as the string "true"/"false"; HF stores 1/0 (ClassLabel
    False/True), which lm-eval uses as the index into ``["no", "yes"]``. Labels are cross-checked against
    Google's dev.jsonl.
    """
    rows = read_jsonl(src / "boolq/superglue_val.jsonl")
    google = read_jsonl(src / "boolq/dev.jsonl")
    label_map = {"true": 1, "false": 0, True: 1, False: 0}
    out = []
    for i, (row, ref) in enumerate(zip(rows, google, strict=True)):
        label = label_map[row["label"]]
        if label != int(ref["answer"]) or row["question"] != ref["question"] or row["idx"] != i:
            raise ValueError(f"boolq item {i} disagrees with boolq/dev.jsonl")
        out.append({"question": row["question"], "passage": row["passage"], "idx": row["idx"], "label": label})
    return out


def convert_piqa(src: Path) -> list[dict[str, Any]]:
    """PIQA valid.jsonl + valid-labels.lst → ``baber/piqa`` layout (goal, sol1, sol2, label int).

    The HF copy carries one extra ``id`` field which no prompt uses, so it is not invented here.
    """
    rows = read_jsonl(src / "piqa/valid.jsonl")
    labels = read_labels(src / "piqa/valid-labels.lst")
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": lab}
        for r, lab in zip(rows, labels, strict=True)
    ]


def convert_winogrande(src: Path) -> list[dict[str, Any]]:
    """WinoGrande 1.1 dev → ``allenai/winogrande`` winogrande_xl validation layout (HF fields, no qID)."""
    rows = read_jsonl(src / "winogrande/dev.jsonl")
    labels = read_labels(src / "winogrande/dev-labels.lst")
    out = []
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        if str(lab) != r["answer"] or r["sentence"].count("_") < 1:
            raise ValueError(f"winogrande item {i}: answer {r['answer']!r} vs label {lab} / no blank")
        out.append(
            {
                "sentence": r["sentence"],
                "option1": r["option1"],
                "option2": r["option2"],
                "answer": r["answer"],
            }
        )
    return out


def _arc_like(rows: list[dict[str, Any]], question_key: str) -> list[dict[str, Any]]:
    """AI2 nested layout ``question{stem, choices[{text,label}]}`` → HF flat ``choices{text[], label[]}``."""
    out = []
    for r in rows:
        choices = r["question"]["choices"]
        item = {
            "id": r["id"],
            question_key: r["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": r["answerKey"],
        }
        if item["answerKey"].lstrip() not in item["choices"]["label"]:
            raise ValueError(f"{r['id']}: answerKey {r['answerKey']!r} not among {item['choices']['label']}")
        out.append(item)
    return out


def convert_arc(src: Path, name: str) -> list[dict[str, Any]]:
    """ARC-Easy/Challenge test → ``allenai/ai2_arc`` layout (id, question, choices{text,label}, answerKey)."""
    fname = {
        "arc_easy": "arc_easy/ARC-Easy-Test.jsonl",
        "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
    }
    return _arc_like(read_jsonl(src / fname[name]), "question")


def convert_openbookqa(src: Path) -> list[dict[str, Any]]:
    """OpenBookQA Main test → ``allenai/openbookqa`` main layout (id, question_stem, choices, answerKey)."""
    return _arc_like(read_jsonl(src / "openbookqa/test.jsonl"), "question_stem")


def _hellaswag_blocks(path: Path) -> Iterator[tuple[str, int, list[str]]]:
    """Yield (context line, label, 4 endings) from the llama.cpp 6-lines-per-item text file."""
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6")
    for k in range(0, len(lines), 6):
        yield lines[k], int(lines[k + 1]), lines[k + 2 : k + 6]


def convert_hellaswag(src: Path) -> list[dict[str, Any]]:
    """HellaSwag validation from the *derived* text file → ``Rowan/hellaswag`` layout.

    The file holds ``preprocess(activity_label + ": " + ctx)`` with ``ctx = ctx_a + " " + ctx_b`` as stored
    upstream, i.e. without lm-eval's ``ctx_b.capitalize()``. ``ctx_a``/``ctx_b`` are rebuilt so that
    lm-eval's own ``process_docs`` gives back the original prompt:

    * ActivityNet items (the first 3243): ``ctx_a`` is made of whole sentences and ``ctx_b`` is the
      lower-case fragment after the last ". ". Splitting there lets lm-eval capitalise ``ctx_b`` exactly as
      it does on the HF data (checked: no fragment has an upper-case letter after its first character, so
      ``capitalize()`` changes only the first one).
    * WikiHow items: the split is not recoverable, so the whole context goes into ``ctx_a`` and ``ctx_b`` is
      empty; the prompt then equals the text file's line (see the caveats in data/SOURCES.md).

    ``label`` stays a string, as in the HF dataset. ``source`` (activitynet / wikihow) replaces the lost
    ``source_id``; ``ind`` is the position in the validation split.
    """
    out = []
    for i, (line, label, endings) in enumerate(_hellaswag_blocks(src / "hellaswag/hellaswag_val_full.txt.bz2")):
        activity_label, sep, ctx = line.partition(": ")
        if not sep or not 0 <= label <= 3:
            raise ValueError(f"hellaswag item {i}: cannot parse {line[:80]!r} / label {label}")
        if i < HELLASWAG_N_ACTIVITYNET:
            cut = ctx.rfind(". ")
            ctx_a, ctx_b = (ctx[: cut + 1], ctx[cut + 2 :]) if cut >= 0 else ("", ctx)
            if ctx_b[1:] != ctx_b[1:].lower():
                raise ValueError(f"hellaswag item {i}: ctx_b {ctx_b!r} has upper case; capitalize() would alter it")
            source = "activitynet"
        else:
            ctx_a, ctx_b, source = ctx, "", "wikihow"
        out.append(
            {
                "ind": i,
                "activity_label": activity_label,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}".strip(),
                "endings": endings,
                "source": source,
                "split": "val",
                "label": str(label),
            }
        )
    return out


def check_hellaswag_rendering(rows: list[dict[str, Any]], src: Path) -> dict[str, int]:
    """Check lm-eval's preprocessing renders each converted item as its text-file line + restored capital.

    lm-eval applies its ``preprocess`` (drop any ``[...]``, collapse double spaces) to the original text;
    the derived file removed only the WikiHow tags, so a few lines still hold bracketed text that lm-eval
    drops as well. The expected prompt is therefore ``preprocess(line with restored capital)``. Returns
    counts for data/SOURCES.md. Imported lazily so the other converters do not need lm-eval.
    """
    from lm_eval.tasks.hellaswag.utils import preprocess

    counts = {"restored": 0, "ctx_preprocessed": 0, "endings_preprocessed": 0}
    blocks = _hellaswag_blocks(src / "hellaswag/hellaswag_val_full.txt.bz2")
    for row, (line, _label, endings) in zip(rows, blocks, strict=True):
        query = preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        expected = line
        if row["source"] == "activitynet" and row["ctx_b"]:
            expected = line[: len(line) - len(row["ctx_b"])] + row["ctx_b"][0].upper() + row["ctx_b"][1:]
            counts["restored"] += expected != line
        counts["ctx_preprocessed"] += preprocess(expected) != expected
        counts["endings_preprocessed"] += sum(preprocess(e) != e for e in endings)
        if query != preprocess(expected):
            raise ValueError(f"hellaswag item {row['ind']}: lm-eval renders {query!r}, expected {expected!r}")
    return counts


# ---------------------------------------------------------------------------------------------- SOURCES.md

SOURCES_TEMPLATE = """\
# data/: provenance of the evaluation files

Generated by `python scripts/convert_data.py --shared ../shared` from the copies in `shared/data/` (their
origin, commits and licenses are documented in `shared/data/SOURCES.md`; the inputs are checked against the
sha256 listed there before conversion). Nothing under `../shared` is read at run time: these files are
committed.

The task files are gzipped jsonl (written with mtime 0, so rerunning the script is byte-identical). They use
the field layout of the HF datasets that lm-eval 0.4.13's built-in task YAMLs read, so the local tasks in
`gradmap/eval/tasks/*.yaml` render the same prompts and choices as `lm_eval --tasks <name>`, item for item
(tested in `tests/test_evaluate.py`), except for the HellaSwag caveat below.

## Files

| file | lm-eval task / use | items | HF layout | source in shared/data | sha256 |
|---|---|---|---|---|---|
{table}

## Conversions

- **boolq** (`aps/super_glue`, boolq, validation): `question`, `passage` (= `title + " -- " + passage`, as
  in SuperGLUE), `idx`, `label`. The OpenCompass copy stores `label` as the string "true"/"false"; it is
  converted to the HF int (1 = yes, 0 = no) and checked against Google's `dev.jsonl` for all items.
- **piqa** (`baber/piqa`, validation): `goal`, `sol1`, `sol2`, `label` (int from `valid-labels.lst`). The HF
  copy has one more field, `id`, which no prompt reads; it is not invented here.
- **winogrande** (`allenai/winogrande`, winogrande_xl, validation): `sentence`, `option1`, `option2`,
  `answer` ("1"/"2", checked against `dev-labels.lst`). The upstream `qID` is dropped (not in the HF dataset).
- **arc_easy / arc_challenge** (`allenai/ai2_arc`, test): `id`, `question` (= stem),
  `choices{{text, label}}`, `answerKey`. Items with 3 or 5 choices and "1".."4" labels are kept as in the
  original.
- **openbookqa** (`allenai/openbookqa`, main, test): `id`, `question_stem`, `choices{{text, label}}`,
  `answerKey`.
- **hellaswag** (`Rowan/hellaswag`, validation): rebuilt from the *derived* llama.cpp text file (the
  original jsonl was not available): `ind`, `activity_label`, `ctx_a`, `ctx_b`, `ctx`, `endings`, `split`,
  `label` (string, as in HF), plus `source` (activitynet | wikihow) in place of the unrecoverable
  `source_id`/`split_type`.
  - ActivityNet items (0..3242): the text file lower-cases the first letter of `ctx_b`. `ctx_b` is recovered
    as the fragment after the last ". " (all are lower case after their first character), so lm-eval's own
    `process_docs` (`ctx_a + " " + ctx_b.capitalize()`) restores the capital: {restored} prompts changed by
    this, and the check in the script confirms lm-eval renders each expected prompt. 7 fragments start with
    a digit or a quote (e.g. "2 a guy"), where `capitalize()` is a no-op; if upstream `ctx_b` began later
    there, the original prompt has one capital letter that ours lacks.
  - **WikiHow items (3243..10041): NOT exactly lm-eval's prompts.** The `ctx_a`/`ctx_b` split, a leading
    space and the `[title]`/`[step]` tags were lost in the derived file, so the whole context is stored in
    `ctx_a` with an empty `ctx_b`; lm-eval's prompt differs from ours wherever upstream `ctx_b` started with
    a lower-case letter (which lm-eval capitalises).
  - The derived file removed only the `[header]`/`[step]`/`[substeps]`/`[title]` tags, so {ctx_preprocessed}
    contexts and {endings_preprocessed} endings still hold other `[...]` text (e.g. `[www.kiddio.org]`) or
    double spaces. They are stored as found; lm-eval's `preprocess` removes them at render time, as it does
    on the original data, so the rendered prompts agree there too. Report HellaSwag numbers from these files
    as "HellaSwag (derived text, close to but not exactly lm-eval)"; SOURCES.md in `shared/` estimates the
    ActivityNet capital alone moves accuracy by about a point.
- **wikitext2/wiki.test.raw.reconstructed**: WikiText-2 raw test, *reconstructed* (not byte-verified against
  the original) from the HF-joined raw rows and the tokenized file's line structure; 4358 lines = the HF row
  count. `gradmap.eval.perplexity` turns it into HF rows (`line + "\\n"`, or "" for blank lines) joined with
  "\\n\\n".
- **wikitext2/wiki.valid.tokens**: calibration STOPGAP (WikiText-2 v1 *tokenized* validation, `<unk>` and
  tokenized spacing) because the train split was not available; it does not overlap the test split.

Licenses: BoolQ CC BY-SA 3.0 (Google), PIQA AFL v3.0, WinoGrande / ARC (CC BY-SA 4.0) / OpenBookQA from AI2,
HellaSwag MIT, WikiText CC BY-SA 3.0 / GFDL; see `shared/data/SOURCES.md` for the exact copies used.
"""

SOURCE_OF: dict[str, str] = {
    "boolq": "boolq/superglue_val.jsonl (+ dev.jsonl check)",
    "piqa": "piqa/valid.jsonl + valid-labels.lst",
    "hellaswag": "hellaswag/hellaswag_val_full.txt.bz2 (derived)",
    "winogrande": "winogrande/dev.jsonl + dev-labels.lst",
    "arc_easy": "arc_easy/ARC-Easy-Test.jsonl",
    "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
    "openbookqa": "openbookqa/test.jsonl",
}
HF_LAYOUT: dict[str, str] = {
    "boolq": "aps/super_glue boolq validation",
    "piqa": "baber/piqa validation",
    "hellaswag": "Rowan/hellaswag validation",
    "winogrande": "allenai/winogrande winogrande_xl validation",
    "arc_easy": "allenai/ai2_arc ARC-Easy test",
    "arc_challenge": "allenai/ai2_arc ARC-Challenge test",
    "openbookqa": "allenai/openbookqa main test",
}


def resolve_shared(shared: Path) -> Path:
    """Accept either the shared root or its ``data/`` folder."""
    for cand in (shared / "data", shared):
        if (cand / "SOURCES.md").is_file() and (cand / "boolq").is_dir():
            return cand
    raise FileNotFoundError(f"--shared {str(shared)!r} holds no data/SOURCES.md; pass the shared dir, e.g. ../shared")


def check_inputs(src: Path) -> None:
    """Fail early (one line) if an input is missing or not the copy documented in shared/data/SOURCES.md."""
    for rel, want in INPUT_SHA256.items():
        path = src / rel
        if not path.is_file():
            raise FileNotFoundError(f"missing input {str(path)!r}")
        got = sha256_file(path)
        if got != want:
            raise ValueError(f"{rel}: sha256 {got} differs from the documented {want}")


def convert(shared: Path, out: Path) -> dict[str, tuple[str, int]]:
    """Write every data file under ``out``; return {relative path: (sha256, items or lines)}."""
    src = resolve_shared(shared)
    check_inputs(src)
    converters = {
        "boolq": convert_boolq,
        "piqa": convert_piqa,
        "hellaswag": convert_hellaswag,
        "winogrande": convert_winogrande,
        "arc_easy": lambda s: convert_arc(s, "arc_easy"),
        "arc_challenge": lambda s: convert_arc(s, "arc_challenge"),
        "openbookqa": convert_openbookqa,
    }
    produced: dict[str, tuple[str, int]] = {}
    hs_counts: dict[str, int] = {}
    for task, fn in converters.items():
        rows = fn(src)
        if len(rows) != EXPECTED_ITEMS[task]:
            raise ValueError(f"{task}: {len(rows)} items, expected {EXPECTED_ITEMS[task]}")
        if task == "hellaswag":
            hs_counts = check_hellaswag_rendering(rows, src)
        path = out / OUTPUT_FILES[task]
        n = write_jsonl_gz(path, rows)
        produced[OUTPUT_FILES[task]] = (sha256_file(path), n)
        print(f"{task:14s} {n:6d} items -> {path}")
    for rel in WIKITEXT_FILES:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst)
        lines = dst.read_bytes().count(b"\n")
        produced[rel] = (sha256_file(dst), lines)
        print(f"{rel:40s} {lines:6d} lines copied")
    write_sources_md(out, produced, hs_counts)
    return produced


def write_sources_md(out: Path, produced: dict[str, tuple[str, int]], hs_counts: dict[str, int]) -> None:
    """Write data/SOURCES.md with the hash table of what was just produced."""
    rows = []
    for task, rel in OUTPUT_FILES.items():
        sha, n = produced[rel]
        rows.append(f"| `{rel}` | {task} | {n} | {HF_LAYOUT[task]} | `{SOURCE_OF[task]}` | `{sha}` |")
    sha, n = produced["wikitext2/wiki.test.raw.reconstructed"]
    rows.append(
        f"| `wikitext2/wiki.test.raw.reconstructed` | perplexity (WikiText-2 raw test) | {n} lines | "
        f"wikitext-2-raw-v1 test, one row per line | same path (byte copy) | `{sha}` |"
    )
    sha, n = produced["wikitext2/wiki.valid.tokens"]
    rows.append(
        f"| `wikitext2/wiki.valid.tokens` | calibration (stopgap) | {n} lines | "
        f"WikiText-2 v1 tokenized valid | same path (byte copy) | `{sha}` |"
    )
    (out / "SOURCES.md").write_text(SOURCES_TEMPLATE.format(table="\n".join(rows), **hs_counts), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, required=True, help="shared dir (or its data/ folder)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data", help="output dir (default: repo data/)")
    args = parser.parse_args(argv)
    produced = convert(args.shared.expanduser().resolve(), args.out.resolve())
    total = sum((args.out / rel).stat().st_size for rel in produced)
    print(f"wrote {len(produced)} files, {total / 1e6:.1f} MB, and {args.out / 'SOURCES.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
