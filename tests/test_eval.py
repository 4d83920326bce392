"""`neo-jax eval`: VLMEvalKit TSV reading (base64 images), prompts, answer parsing, scores and outputs."""
import base64
import csv
import io
import json

import pytest
from PIL import Image

from neo_jax import cli
from neo_jax.eval import cli as eval_cli
from neo_jax.eval import vlmeval


def _png_b64(w, h, color):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_tsv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)


# (question, options A-D, answer, category, scripted prediction, correct?)
MCQ = [
    ("What is red?", ("apple", "sky", "grass", "coal"), "A", "x", "A", True),
    ("What barks?", ("cat", "dog", "cow", "fish"), "B", "x", "The answer is (B).", True),
    ("What moos?", ("cat", "dog", "cow", "fish"), "C", "y", "B. dog", False),
    ("What is striped?", ("cat", "dog", "cow", "zebra"), "D", "y", "I think it is a zebra", True),
    ("What flies?", ("bird", "rock", "tree", "car"), "A", "y", "no idea", False),  # names no option
]
VQA = [  # (question, answer, prediction, correct?)
    ("How many cats?", "two", "2", True),
    ("What colour?", '["Red", "crimson"]', "crimson.", True),
    ("What animal?", "the cat", "a dog", False),
]


@pytest.fixture()
def fixtures(tmp_path):
    mcq, vqa = tmp_path / "mcq.tsv", tmp_path / "vqa.tsv"
    rows = []
    for i, (q, opts, ans, cat, _, _) in enumerate(MCQ):
        img = _png_b64(32 + 8 * i, 24, (10 * i, 0, 0)) if i != 4 else "0"  # row 4 reuses row 0's image
        rows.append([i, img, q, *opts, ans, cat])
    _write_tsv(mcq, ["index", "image", "question", "A", "B", "C", "D", "answer", "category"], rows)
    _write_tsv(vqa, ["index", "image", "question", "answer"],
               [[i, _png_b64(40, 40 + i, (0, 0, 0)), q, a] for i, (q, a, _, _) in enumerate(VQA)])
    return str(mcq), str(vqa)


def scripted_answer_fn(calls):
    """A fake model: scripted text for the TSV questions; synthetic rows (which arrive after the TSVs, in
    order) answered right on even rows and wrong on odd ones."""
    script = {q: p for q, *_, p, _ in MCQ} | {q: p for q, _, p, _ in VQA}
    synth = [(r["question"], r["answer"]) for r in vlmeval.synthetic_rows(size=6)]
    seen = []

    def answer_fn(prompts, images):
        calls.append(len(prompts))
        out = []
        for prompt, imgs in zip(prompts, images):
            assert len(imgs) == 1 and Image.open(io.BytesIO(imgs[0])).size[0] >= 32  # decoded base64 PNG
            q = next((q for q in script if q in prompt), None)
            if q is None:
                i = len(seen)
                seen.append(prompt)
                assert prompt == synth[i][0]  # asked exactly as in training
                out.append(synth[i][1] if i % 2 == 0 else "purple elephant")
                continue
            if any(q == m[0] for m in MCQ):
                assert "Options:\nA. " in prompt and prompt.endswith(vlmeval.MCQ_SUFFIX)
            else:
                assert prompt.endswith(vlmeval.VQA_SUFFIX)
            out.append(script[q])
        return out

    return answer_fn


def test_eval_cli_scores_a_scripted_model(fixtures, tmp_path, monkeypatch, capsys):
    mcq, vqa = fixtures
    calls = []
    monkeypatch.setattr(eval_cli, "load_answer_fn", lambda args: scripted_answer_fn(calls))
    out = tmp_path / "res" / "results.json"
    rc = cli.main(["eval", "--ckpt", str(tmp_path), "--data", mcq, "--data", vqa, "--data", "synthetic:6",
                   "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    s = res["summary"]
    assert (s["mcq"]["correct"], s["mcq"]["n"], s["mcq"]["unparsed"]) == (3, 5, 1)
    assert s["mcq"]["by_category"] == {"x": {"accuracy": 1.0, "n": 2}, "y": {"accuracy": pytest.approx(1 / 3), "n": 3}}
    assert (s["vqa"]["correct"], s["vqa"]["n"], s["vqa"]["unparsed"]) == (2, 3, 0)
    assert (s["synthetic_test"]["correct"], s["synthetic_test"]["n"]) == (3, 6)
    assert 0 < s["synthetic_test"]["chance"] < 1
    from neo_jax.data.synthetic import chance

    assert s["synthetic_test"]["by_category"] and all(
        v["chance"] == chance(c) for c, v in s["synthetic_test"]["by_category"].items())
    preds = res["results"]["mcq"]["predictions"]
    assert [p["correct"] for p in preds] == [m[-1] for m in MCQ]
    assert [p["parsed"] for p in preds] == ["A", "B", "B", "D", None]
    assert [p["correct"] for p in res["results"]["vqa"]["predictions"]] == [v[-1] for v in VQA]
    assert calls == [2, 2, 1, 2, 1, 2, 2, 2]  # batches of --batch-size per benchmark
    table = capsys.readouterr().out
    assert "| mcq | all | 60.0 | 5 | 1 |" in table and "| vqa | all | 66.7 | 3 | 0 |" in table
    assert "| synthetic_test | all | 50.0 | 6 | 0 |" in table


def test_option_extraction_and_normalisation():
    opts = {"A": "red apple", "B": "blue sky", "C": "green", "D": "red"}
    cases = {"A": "A", "(C)": "C", "D.": "D", "B) blue sky": "B", "Answer: C": "C", "option (a)": "A",
             "It is the blue sky.": "B", "red": "D", "": None, "E": None, "green or blue sky": None}
    for text, want in cases.items():
        assert vlmeval.extract_option(text, opts) == want, text
    assert vlmeval.normalize_answer("The  Two cats!") == "2 cats"
    assert vlmeval.accepted_answers('["a", "b"]') == ["a", "b"] and vlmeval.accepted_answers("[x") == ["[x"]


def test_bad_inputs_are_refused(fixtures, tmp_path, capsys):
    mcq, _ = fixtures
    bad = tmp_path / "bad.tsv"
    _write_tsv(bad, ["index", "image", "question", "answer"], [[0, "not base64!", "q", "a"]])
    with pytest.raises(ValueError, match="index='0'.*base64"):
        vlmeval.read_tsv(str(bad))
    _write_tsv(bad, ["index", "question", "answer"], [[0, "q", "a"]])
    with pytest.raises(ValueError, match="missing columns"):
        vlmeval.read_tsv(str(bad))
    assert cli.main(["eval", "--ckpt", str(tmp_path), "--data", str(tmp_path / "none.tsv")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["eval", "--ckpt", str(tmp_path), "--data", "synthetic:x"]) == 2
    assert len(vlmeval.read_tsv(mcq, limit=2)) == 2 and len(vlmeval.synthetic_rows(size=3)) == 3
