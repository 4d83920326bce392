"""Checkpointer on plain pytrees: schedule and retention, atomicity, re-sharding restore, params-only load."""
import os
import shutil
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from neo_jax.train import checkpoint as ckpt_lib


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: tuple
    rng: jax.Array


def make_state(i, sharding=None):
    w = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) + i
    if sharding is not None:
        w = jax.device_put(w, sharding)
    return State(jnp.int32(i), {"w": w, "b": jnp.full((8,), float(i))}, (jnp.ones(8) * i, None),
                 jax.random.key(i))


def cfg(every=2, keep=2, keep_every=4, async_save=True):
    c = ckpt_lib.checkpoint_config()
    c.every, c.keep, c.keep_every, c.async_save = every, keep, keep_every, async_save
    return c


def test_schedule_retention_and_items(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path, cfg())
    saved = [i for i in range(1, 10) if ck.save(i, make_state(i), data_state={"pos": i}, config={"step": i})]
    assert saved == [2, 4, 6, 8]
    assert ck.save(9, make_state(9), data_state={"pos": 9}, force=True)  # e.g. the final or SIGTERM save
    ck.wait()
    assert ck.all_steps() == [4, 8, 9]  # last 2 (8, 9) + every 4th (4, 8)
    state, data, config = ck.restore(ckpt_lib.abstract(make_state(0)))
    assert int(state.step) == 9 and data == {"pos": 9} and config == {}
    np.testing.assert_array_equal(state.params["w"], make_state(9).params["w"])
    assert state.opt_state[1] is None
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(jax.random.key(9)))
    state, data, config = ck.restore(ckpt_lib.abstract(make_state(0)), step=8)
    assert int(state.step) == 8 and data == {"pos": 8} and config == {"step": 8}
    ck.close()


def test_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `neo-jax demo --workdir neo_demo`: Orbax itself refuses relative paths
    ck = ckpt_lib.Checkpointer("run/checkpoints", cfg(every=1))
    assert ck.save(1, make_state(1), data_state={"pos": 1})
    ck.close()
    found = ckpt_lib.find_checkpoint_dir("run")
    assert found == tmp_path / "run" / "checkpoints"
    state, data, _ = ckpt_lib.Checkpointer(found, cfg(), read_only=True).restore(ckpt_lib.abstract(make_state(0)))
    assert int(state.step) == 1 and data == {"pos": 1}


def test_half_written_checkpoint_is_never_latest(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path, cfg(every=1, keep=5, keep_every=0, async_save=False))
    ck.save(1, make_state(1))
    ck.save(2, make_state(2))
    ck.close()
    # A crash mid-save leaves Orbax's temporary directory; a partial copy leaves a step without its marker.
    for name in ("3.orbax-checkpoint-tmp-1700000000", "4"):
        shutil.copytree(tmp_path / "2", tmp_path / name)
        os.remove(tmp_path / name / "commit_success.txt")
    ck = ckpt_lib.Checkpointer(tmp_path, cfg(every=1, keep=5, keep_every=0), read_only=True)
    assert ck.all_steps() == [1, 2] and ck.latest_step() == 2
    state, _, _ = ck.restore(ckpt_lib.abstract(make_state(0)))
    assert int(state.step) == 2
    # A writable one sets the uncommitted step aside (so step 4 can be saved again) and Orbax deletes the
    # leftover temporary directory (in a background thread).
    ck = ckpt_lib.Checkpointer(tmp_path, cfg(every=1, keep=5, keep_every=0))
    assert ck.save(4, make_state(4), force=True)
    ck.close()
    assert ck.all_steps() == [1, 2, 4] and len(list(tmp_path.glob("4.uncommitted-*"))) == 1
    for _ in range(50):
        if not (tmp_path / "3.orbax-checkpoint-tmp-1700000000").exists():
            break
        time.sleep(0.1)
    assert not (tmp_path / "3.orbax-checkpoint-tmp-1700000000").exists()


def test_restore_onto_a_different_mesh(tmp_path):
    devices = np.asarray(jax.devices()[:8])
    mesh_a = jax.sharding.Mesh(devices.reshape(2, 4), ("data", "fsdp"))
    mesh_b = jax.sharding.Mesh(devices.reshape(4, 2), ("data", "fsdp"))
    saved = make_state(3, NamedSharding(mesh_a, P("fsdp", None)))
    ck = ckpt_lib.Checkpointer(tmp_path, cfg(every=1))
    ck.save(3, saved)
    ck.wait()
    target_w = NamedSharding(mesh_b, P(None, ("data", "fsdp")))
    repl = NamedSharding(mesh_b, P())
    shardings = State(repl, {"w": target_w, "b": repl}, (repl, None), repl)
    state, _, _ = ck.restore(ckpt_lib.abstract(make_state(0), shardings))
    assert state.params["w"].sharding == target_w
    assert state.params["w"].addressable_shards[0].data.shape == (8, 1)
    np.testing.assert_array_equal(state.params["w"], saved.params["w"])
    params, config = ckpt_lib.load_params(tmp_path)  # params only, onto one device
    assert set(params) == {"w", "b"} and config == {}
    np.testing.assert_array_equal(params["w"], saved.params["w"])
    ck.close()


def test_bad_settings_and_missing_checkpoints_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.every"):
        ckpt_lib.Checkpointer(tmp_path, cfg(every=0))
    ck = ckpt_lib.Checkpointer(tmp_path / "empty", cfg())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.restore(ckpt_lib.abstract(make_state(0)))
    ck.close()
    with pytest.raises(FileNotFoundError, match="pass a training workdir"):
        ckpt_lib.load_params(tmp_path / "nowhere")
