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
