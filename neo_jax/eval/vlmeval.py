"""Benchmark evaluation: VLMEvalKit TSV files and the built-in synthetic held-out split.

A VLMEvalKit TSV has one row per question: `index`, `image` (base64; or the `index` of an earlier row whose
image it reuses), `question`, option columns `A`..`D` (multiple choice; empty or absent for VQA), `answer`
(an option letter, or a short answer / a JSON list of accepted answers), and optional `hint`, `category`.

    rows = read_tsv("MMBench_DEV_EN.tsv")
    result = evaluate(rows, answer_fn, batch_size=8)      # answer_fn(questions, images) -> answers
    print(format_table({"MMBench_DEV_EN": result}))

Multiple choice is scored by the option letter extracted from the answer (`extract_option`); VQA by exact
match after normalisation (`normalize_answer`). Prompts follow VLMEvalKit's defaults for the two kinds.
"""
from __future__ import annotations

import base64
import binascii
import csv
import json
import re
import string
import sys

OPTIONS = tuple("ABCDEFGH")
MCQ_SUFFIX = "Please select the correct answer from the options above."
VQA_SUFFIX = "Answer the question using a single word or phrase."
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def read_tsv(path: str, limit: int | None = None) -> list[dict]:
    """Rows of a VLMEvalKit TSV as dicts: index, images [bytes], question, options {letter: text}, answer,
    hint, category, kind ("mcq" if the row has options, else "vqa"). Bad rows raise ValueError naming them."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default field limit
    with open(path, newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f, delimiter="\t"))
    if not raw:
        raise ValueError(f"{path}: no rows (expected a VLMEvalKit TSV with a header line)")
    missing = {"index", "image", "question", "answer"} - set(raw[0])
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}; have {sorted(raw[0])}")
    by_index = {r["index"]: r["image"] for r in raw}
    rows = []
    for r in raw[:limit]:
        img = r["image"]
        if img in by_index and len(img) < 64:  # VLMEvalKit stores repeated images as the index of a row
            img = by_index[img]
        try:
            data = base64.b64decode(img, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{path}: row index={r['index']!r} has an image that is not base64") from None
        options = {k: r[k].strip() for k in OPTIONS if (r.get(k) or "").strip() and r[k].strip().lower() != "nan"}
        rows.append({"index": r["index"], "images": [data], "question": r["question"], "options": options,
                     "answer": r["answer"].strip(), "hint": (r.get("hint") or "").strip(),
                     "category": (r.get("category") or "").strip() or "all",
                     "kind": "mcq" if options else "vqa"})
    return rows


def synthetic_rows(size: int = 200, seed: int = 0, split: str = "test") -> list[dict]:
    """The built-in synthetic data's held-out split as VQA rows (category = question type). Captions are
    left out: they have no single short answer. Questions are asked exactly as in training."""
    from neo_jax.data import synthetic

    qtypes = tuple(q for q in synthetic.QTYPES if q != "caption")
    src = synthetic.SyntheticSource(split, size=size, seed=seed, qtypes=qtypes)
    rows = []
    for i in range(len(src)):
        r = src[i]
        question = r["conversations"][0]["value"].replace("<image>\n", "", 1)
        rows.append({"index": r["id"], "images": r["images"], "question": question, "options": {},
                     "answer": r["meta"]["answer"], "hint": "", "category": r["meta"]["qtype"], "kind": "vqa",
                     "raw_question": True})
    return rows


def build_prompt(row: dict) -> str:
    """VLMEvalKit's default prompts: hint, question, lettered options, instruction (MCQ); question plus a
    short-answer instruction (VQA). Rows marked raw_question (synthetic data) are asked as trained."""
    if row.get("raw_question"):
        return row["question"]
    if row["kind"] == "mcq":
        parts = [f"Hint: {row['hint']}"] if row["hint"] else []
        parts.append(f"Question: {row['question']}")
        parts.append("Options:\n" + "\n".join(f"{k}. {v}" for k, v in row["options"].items()))
        parts.append(MCQ_SUFFIX)
        return "\n".join(parts)
    return f"{row['question']}\n{VQA_SUFFIX}"


def extract_option(prediction: str, options: dict) -> str | None:
    """The option letter a free-form answer chose, or None when it names none (or several) of them.

    Tries, in order: the answer is just a letter ("B", "B.", "(B)"); it starts with one ("B. cat"); an
    explicit phrase ("answer is B", "option (B)"); exactly one option's text appears in the answer."""
    letters = "".join(options)
    text = prediction.strip()
    if not text or not letters:
        return None
    m = re.fullmatch(rf"\(?([{letters}])\)?[.:)]?", text)
    if m:
        return m.group(1)
    m = re.match(rf"\(?([{letters}])\)?[.:)]\s", text + " ")
    if m:
        return m.group(1)
    m = re.search(rf"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([{letters}])\)?(?![A-Za-z])", text, re.I)
    if m:
        return m.group(1).upper()
    hits = [k for k, v in options.items() if v and normalize_answer(v) and
            re.search(rf"(?<![a-z0-9]){re.escape(normalize_answer(v))}(?![a-z0-9])", normalize_answer(text))]
    return hits[0] if len(hits) == 1 else None


def normalize_answer(s: str) -> str:
    """Lower case, punctuation to spaces, number words to digits, articles dropped, single spaces."""
    s = s.lower().strip()
    s = s.translate(str.maketrans({c: " " for c in string.punctuation if c not in "'"})).replace("'", "")
    words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def accepted_answers(answer: str) -> list[str]:
    """A row's accepted answers: a JSON list of strings, or the answer itself."""
    if answer.startswith("["):
        try:
            got = json.loads(answer)
            if isinstance(got, list) and all(isinstance(a, str) for a in got):
                return got
        except json.JSONDecodeError:
            pass
    return [answer]


def score(row: dict, prediction: str) -> dict:
    """{correct: bool, parsed: the chosen letter / normalised answer or None}."""
    if row["kind"] == "mcq":
        choice = extract_option(prediction, row["options"])
        return {"correct": choice is not None and choice == row["answer"].upper(), "parsed": choice}
    norm = normalize_answer(prediction)
    return {"correct": any(norm == normalize_answer(a) for a in accepted_answers(row["answer"])), "parsed": norm}


def evaluate(rows: list[dict], answer_fn, batch_size: int = 8, progress=None) -> dict:
    """Answers every row in batches with answer_fn(prompts, images) -> list[str] and scores them.

    Returns {accuracy, n, correct, unparsed (MCQ answers naming no option), by_category {name: {accuracy,
    n}}, kind, predictions [{index, category, prediction, parsed, answer, correct}]}."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; need >= 1")
    preds = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        answers = answer_fn([build_prompt(r) for r in chunk], [r["images"] for r in chunk])
        if len(answers) != len(chunk):
            raise RuntimeError(f"answer_fn returned {len(answers)} answers for {len(chunk)} questions")
        for r, a in zip(chunk, answers):
            s = score(r, a)
            preds.append({"index": r["index"], "category": r["category"], "kind": r["kind"], "prediction": a,
                          "parsed": s["parsed"], "answer": r["answer"], "correct": bool(s["correct"])})
        if progress:
            progress(len(preds), len(rows))
    cats = {}
    for p in preds:
        c = cats.setdefault(p["category"], [0, 0])
        c[0] += p["correct"]
        c[1] += 1
    n, correct = len(preds), sum(p["correct"] for p in preds)
    kinds = sorted({r["kind"] for r in rows})
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct,
            "unparsed": sum(p["kind"] == "mcq" and p["parsed"] is None for p in preds),
            "kind": "+".join(kinds), "by_category": {k: {"accuracy": v[0] / v[1], "n": v[1]}
                                                    for k, v in sorted(cats.items())},
            "predictions": preds}


def format_table(results: dict) -> str:
    """A Markdown table: one line per benchmark (accuracy in %, n, unparsed MCQ answers) and per category."""
    lines = ["| benchmark | category | accuracy (%) | n | unparsed |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | all | {100 * r['accuracy']:.1f} | {r['n']} | {r['unparsed']} |")
        if len(r["by_category"]) > 1:
            for cat, c in r["by_category"].items():
                lines.append(f"| {name} | {cat} | {100 * c['accuracy']:.1f} | {c['n']} | |")
    return "\n".join(lines)
