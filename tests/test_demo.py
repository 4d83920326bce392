"""The demo config trains a few steps; `neo-jax generate` and the held-out evaluation run on its checkpoint;
inference prompts are token-for-token the training encoding."""
import io

import numpy as np
import pytest
from PIL import Image

from neo_jax import cli, config
from neo_jax.data import synthetic
from neo_jax.data.encode import encode_record
from neo_jax.data.tokenizer import load_tokenizer
from neo_jax.infer.cli import batch_prompts, encode_prompt
from neo_jax.train import demo
from neo_jax.train.loop import train


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    cfg = config.load("demo:sft", ["train.total_steps=2", "log.every=1", "log.progress=False"])
    return workdir, train(cfg, str(workdir))


def test_demo_config_trains(demo_run):
    workdir, summary = demo_run
    assert summary["step"] == 2 and len(summary["history"]) == 2
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in summary["history"])
    assert summary["history"][0]["data/pack_efficiency"] > 0.5
    assert (workdir / "checkpoints" / "2" / "commit_success.txt").exists()


def test_prompt_matches_the_training_encoding():
    cfg = config.load("demo:sft")
    tok = load_tokenizer("builtin")
    record = synthetic.SyntheticSource("test", 4, 0)[1]
    px = dict(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    train_doc = encode_record(record, tok, loss_weighting="token", **px)
    question = record["conversations"][0]["value"].replace("<image>\n", "")
    prompt = encode_prompt(tok, question, record["images"], **px)
    n = len(prompt["tokens"])
    assert tok.decode(prompt["tokens"]).endswith("<|im_start|>assistant\n")
    np.testing.assert_array_equal(prompt["tokens"], train_doc["tokens"][:n])
    np.testing.assert_array_equal(prompt["positions"], train_doc["positions"][:n])
    np.testing.assert_array_equal(prompt["patches"], train_doc["patches"])
    batch = batch_prompts([prompt, encode_prompt(tok, "Describe the image.", [], **px)], tok.pad_id)
    assert batch["tokens"].shape[0] == 2 and (batch["segment_ids"][1] == 0).sum() > 0  # left padding
    assert batch["segment_ids"][0].all() and batch["patches"].shape[1] == len(prompt["patches"])


def test_generate_cli_and_heldout_eval(demo_run, tmp_path, capsys):
    workdir, _ = demo_run
    record = synthetic.SyntheticSource("test", 2, 0)[0]
    image = tmp_path / "scene.png"
    Image.open(io.BytesIO(record["images"][0])).save(image)
    for extra in ([], ["--temperature", "0.8", "--top-k", "5", "--seed", "1"]):
        rc = cli.main(["generate", "--ckpt", str(workdir), "--image", str(image), "--prompt",
                       "What color is the square?", "--max-new-tokens", "4", *extra])
        assert rc == 0
    assert capsys.readouterr().out.count("\n") == 2  # one answer line per call (untrained: any text)
    assert cli.main(["generate", "--ckpt", str(workdir), "--prompt", "x", "--top-k", "-1"]) == 2
    results = demo.evaluate(str(workdir), 6, ("color", "shape", "left_right"), batch=6)
    assert sum(n for _, n in results.values()) == 6
    text, acc, chance = demo.report(results)
    assert "chance" in text and 0 <= acc <= 1 and 0 < chance < 1


def test_synthetic_scenes_answer_from_the_layout():
    """Scenes are 96 x 96 (one image token per grid cell) and the side questions' answers follow the
    named object's cell; test and train splits are different scenes."""
    rng = np.random.default_rng(0)
    for qtype, axis, words in (("left_right", 3, ("left", "right")), ("above_below", 2, ("above", "below"))):
        for _ in range(50):
            objects, letter, question, answer = synthetic.make_scene(rng, qtype)
            s, c, row, col = objects[0]
            assert f"the {c} {s} " in question and letter is None
            assert sum(o[:2] == (s, c) for o in objects) == 1  # the named object is unique
            assert answer == words[(row, col)[axis - 2] // 2]  # outer cells only: 0 -> first word, 2 -> second
    record = synthetic.SyntheticSource("test", 4, 0)[0]
    assert Image.open(io.BytesIO(record["images"][0])).size == synthetic.SIZE == (96, 96)
    train_imgs = {synthetic.SyntheticSource("train", 16, 0)[i]["images"][0] for i in range(16)}
    assert all(synthetic.SyntheticSource("test", 16, 0)[i]["images"][0] not in train_imgs for i in range(16))


def test_heldout_questions_skip_scenes_seen_in_training():
    cfg = config.load("demo:sft")
    seen = demo.training_scenes([cfg])
    assert len(seen) > 1000
    qtypes = tuple(cfg.eval_qtypes)
    records, skipped = demo.heldout_records(60, qtypes, exclude=seen)
    assert len(records) == 60 and skipped > 0  # simple scenes do recur across independently drawn splits
    test = synthetic.SyntheticSource("test", 6000, 0, qtypes)
    idx = [int(r["id"].rsplit("/", 1)[1]) for r in records]
    assert all(test.scene_key(i) not in seen for i in idx) and idx[-1] == 60 + skipped - 1
    assert records[0]["images"][0] == test[idx[0]]["images"][0]
