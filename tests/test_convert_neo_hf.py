"""Official NEO layout: export is loaded by an independent PyTorch NEO; export -> import is bit-exact;
bad checkpoints are refused with errors naming the key or file, leaving no output behind."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402  (the reference reader checks what we write)

from neo_jax.convert import checkpoint, neo_hf  # noqa: E402
from neo_jax.convert import safetensors_io as st  # noqa: E402
from neo_jax.model.config import ModelConfig  # noqa: E402
from neo_jax.model.init import init_params  # noqa: E402
from neo_jax.model.neo import NEO  # noqa: E402
from neo_jax.model.rope import native_positions  # noqa: E402
from tests import neo_torch_ref  # noqa: E402


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return ModelConfig.from_dict(tiny_config.model)


@pytest.fixture(scope="module")
def params(cfg):
    """Random tiny NEO with perturbed norms and non-zero k_proj_hw everywhere (every tensor matters)."""
    p = init_params(cfg, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(p)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    out = [x + 0.1 * jax.random.normal(k, x.shape) if path[-1].key == "scale" else x
           for (path, x), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="module")
def exported(cfg, params, tmp_path_factory):
    out = tmp_path_factory.mktemp("neo_export") / "neo"
    neo_hf.export_hf(params, cfg, str(out))
    return out


def test_pytorch_reference_matches_on_image_and_text(cfg, params, exported):
    rng = np.random.default_rng(0)
    gh, gw = 2, 3  # merged grid of a 64 x 96 (non-square) image
    tokens = [5, 17, cfg.img_start_id] + [cfg.img_context_id] * (gh * gw) + [cfg.img_end_id] + [40, 41, 42, 9]
    image = rng.normal(size=(3, 32 * gh, 32 * gw)).astype(np.float32)
    # neo-jax batch: 16-px patches ((C,row,col) inside), grouped by 2x2 merge windows, windows row-major.
    patches, ppos = [], []
    for wr in range(gh):
        for wc in range(gw):
            for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
                r, c = 2 * wr + dr, 2 * wc + dc
                patches.append(image[:, 16 * r:16 * r + 16, 16 * c:16 * c + 16].reshape(-1))
                ppos.append((r, c))
    toks = np.array([tokens], np.int32)
    batch = {"tokens": toks, "segment_ids": np.ones_like(toks),
             "positions": native_positions(toks[0], [[gh, gw]], img_start_id=cfg.img_start_id,
                                           img_context_id=cfg.img_context_id)[None],
             "patches": np.array([patches], np.float32), "patch_positions": np.array([ppos], np.int32)}
    ours = np.asarray(NEO(cfg).apply({"params": params}, batch))[0]
    hf_cfg, sd = neo_torch_ref.load(exported)
    with torch.no_grad():
        ref = neo_torch_ref.forward(hf_cfg, sd, tokens, torch.from_numpy(image), cfg.img_context_id,
                                    cfg.img_start_id).numpy()
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_config_json_is_the_official_layout(cfg, exported):
    c = json.loads((exported / "config.json").read_text())
    assert (c["model_type"], c["template"], c["architectures"]) == ("neo_chat", "neo1_0", ["NEOChatModel"])
    llm, vis = c["llm_config"], c["vision_config"]
    assert llm["num_hidden_layers"] == cfg.num_layers == len(llm["layer_types"])
    assert llm["extra_num_layers"] == cfg.num_prebuffer_layers and llm["head_dim"] == cfg.head_dim
    assert (llm["model_type"], llm["rope_theta_hw"], vis["model_type"]) == ("qwen3", cfg.rope_theta_hw, "neo_vision")
    assert vis["llm_hidden_size"] == cfg.hidden_size and vis["downsample_ratio"] == 0.5
    assert os.path.isfile(exported / "generation_config.json")
    with safe_open(str(exported / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("vision_model.embeddings.dense_embedding.weight").get_shape() == [64, 32, 2, 2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(cfg, params, tmp_path, dtype):
    p = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    c = dataclasses.replace(cfg, param_dtype=dtype)
    neo_hf.export_hf(p, c, str(tmp_path / "hf"), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / st.INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not os.path.exists(tmp_path / "hf" / "model.safetensors")
    total = 0
    for name in files:
        data = 0
        with safe_open(str(tmp_path / "hf" / name), "numpy") as f:
            for key in f.keys():
                assert index["weight_map"][key] == name
                data += f.get_tensor(key).nbytes
            assert data <= 40_000 or len(f.keys()) == 1  # only a lone tensor may exceed the limit
        total += data
    assert total == index["metadata"]["total_size"] and len(index["weight_map"]) == len(neo_hf.specs(cfg))
    back, back_cfg = neo_hf.import_hf(str(tmp_path / "hf"))
    assert back_cfg == c
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint8),
                                                                      np.asarray(b).view(np.uint8)), back, p)
    if dtype == "float32":  # placed directly on a mesh: same values, each leaf in its sharding
        mesh = jax.make_mesh((8,), ("tensor",))
        spec = jax.sharding.PartitionSpec
        sh = jax.tree_util.tree_map(
            lambda x: jax.sharding.NamedSharding(mesh, spec(*([None] * (x.ndim - 1) + ["tensor"] if x.shape[-1] % 8 == 0 else []))), p)
        placed, _ = neo_hf.import_hf(str(tmp_path / "hf"), shardings=sh)
        jax.tree_util.tree_map(lambda a, s: a.sharding == s or pytest.fail(str(a.sharding)), placed, sh)
        jax.tree_util.tree_map(np.testing.assert_array_equal, placed, p)
    if dtype == "float32":  # importing with a cast gives exactly the cast parameters
        cast, cast_cfg = neo_hf.import_hf(str(tmp_path / "hf"), dtype="bfloat16")
        assert cast_cfg.param_dtype == "bfloat16"
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), cast, p)
    checkpoint.save_params(str(tmp_path / "ckpt"), back, back_cfg)
    again, again_cfg = checkpoint.load_params(str(tmp_path / "ckpt"))
    assert again_cfg == c and jax.tree_util.tree_leaves(again)[0].dtype == jnp.dtype(dtype)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, p)


def _rewrite(src, dst, edit):
    """Copy an exported single-file checkpoint, passing its tensors dict through `edit`."""
    from safetensors.numpy import save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    source = st.TensorSource(str(src))
    tensors = edit({k: source.get(k) for k in source.keys()})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_bad_checkpoints_are_refused_and_write_nothing(exported, tmp_path):
    from neo_jax.cli import main

    key = "language_model.model.layers.1.self_attn.k_proj_hw.weight"
    _rewrite(exported, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != key})
    _rewrite(exported, tmp_path / "shape", lambda t: {**t, key: t[key][:-1]})
    _rewrite(exported, tmp_path / "extra", lambda t: {**t, "language_model.model.layers.9.mlp.up_proj.weight":
                                                      t["language_model.model.norm.weight"]})
    shutil.copytree(exported, tmp_path / "type")
    c = json.loads((exported / "config.json").read_text())
    (tmp_path / "type" / "config.json").write_text(json.dumps(dict(c, model_type="internvl_chat")))
    shutil.copytree(exported, tmp_path / "trunc")
    with open(tmp_path / "trunc" / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(exported / "model.safetensors") - 100)
    cases = {"missing": f"missing tensor '{key}'", "shape": f"tensor '{key}' in model.safetensors has shape",
             "extra": "unexpected tensor 'language_model.model.layers.9.mlp.up_proj.weight'",
             "type": "model_type is 'internvl_chat'", "trunc": "trunc/model.safetensors: truncated"}
    for name, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
            neo_hf.import_hf(str(tmp_path / name))
        out = tmp_path / f"out_{name}"
        assert main(["convert", "import-hf", "--hf-dir", str(tmp_path / name), "--out", str(out)]) == 1
        assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_failed_export_leaves_nothing(cfg, params, tmp_path):
    class Unreadable:  # fails when its turn to be written comes (the final norm, after most tensors)
        shape, dtype = (cfg.hidden_size,), np.dtype(np.float32)

        def __array__(self, *a, **k):
            raise RuntimeError("device lost")

    bad = dict(params, norm={"scale": Unreadable()})
    with pytest.raises(RuntimeError, match="device lost"):
        neo_hf.export_hf(bad, cfg, str(tmp_path / "exp"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="params do not match"):
        neo_hf.export_hf({"embed_tokens": {"embedding": jnp.zeros((3, 3))}}, cfg, str(tmp_path / "exp"))
    with pytest.raises(ValueError, match="model.mask_kind='causal'"):
        neo_hf.export_hf(params, dataclasses.replace(cfg, mask_kind="causal"), str(tmp_path / "exp"))
    assert os.listdir(tmp_path) == []
