"""Mesh construction, rules tables, parameter shardings and multi-host start-up arguments (no compiles)."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from neo_jax.parallel import mesh as mesh_lib, rules


def test_mesh_fills_the_rest_and_names_bad_sizes():
    m = mesh_lib.make_mesh(mesh_lib.mesh_config(data=-1, fsdp=2, tensor=2))
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    one = mesh_lib.make_mesh(mesh_lib.mesh_config(), devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="do not divide"):
        mesh_lib.make_mesh(mesh_lib.mesh_config(data=-1, fsdp=3))
    with pytest.raises(ValueError, match="at most one"):
        mesh_lib.make_mesh(mesh_lib.mesh_config(data=-1, fsdp=-1))
    with pytest.raises(ValueError, match="16 devices"):
        mesh_lib.make_mesh(mesh_lib.mesh_config(data=4, fsdp=4))
    with pytest.raises(ValueError, match="strategy"):
        mesh_lib.mesh_shape(mesh_lib.mesh_config(strategy="zero9"), 8)


def test_initialize_distributed_single_process_is_a_noop(monkeypatch):
    for k in ("NEO_COORDINATOR", "NEO_NUM_PROCESSES", "NEO_PROCESS_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert mesh_lib.initialize_distributed() is False
    monkeypatch.setenv("NEO_NUM_PROCESSES", "1")
    assert mesh_lib.initialize_distributed() is False
    monkeypatch.setenv("NEO_NUM_PROCESSES", "4")
    with pytest.raises(ValueError, match="coordinator"):
        mesh_lib.initialize_distributed()
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.delenv("NEO_NUM_PROCESSES")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[003-004]")
    assert mesh_lib.initialize_distributed() is True
    assert calls == [(("gpu003:12345",), {"num_processes": 2, "process_id": 1})]


def test_rules_per_strategy(tiny_config):
    m = mesh_lib.make_mesh(mesh_lib.mesh_config(data=2, fsdp=2, tensor=2))
    spec = lambda s: rules.param_specs(tiny_config.model, m, s)  # noqa: E731
    dp, fsdp, tp = spec("dp"), spec("fsdp"), spec("fsdp_tp")
    q = ("llm", "layers", "self_attn", "q_proj", "kernel")
    get = lambda t, path: t[path[0]][path[1]][path[2]][path[3]][path[4]]  # noqa: E731
    assert get(dp, q) == P(None, None, None)
    assert get(fsdp, q) == P(None, "fsdp", None)  # [layers, embed, heads]
    assert get(tp, q) == P(None, "fsdp", "tensor")
    assert tp["llm"]["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")  # [layers, mlp, embed]
    assert tp["embed_tokens"]["embedding"] == P("tensor", "fsdp")  # [vocab, embed]
    assert tp["llm"]["layers"]["input_layernorm"]["scale"] == P(None, None)
    assert fsdp["vision"]["patch_embedding"]["kernel"] == P(None, "fsdp")  # [patch, vision]
    assert rules.batch_sharding(m).spec == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="strategy"):
        rules.rules("zero3")


def test_indivisible_dims_fall_back_to_replication(tiny_config):
    m = mesh_lib.make_mesh(mesh_lib.mesh_config(data=1, fsdp=8, tensor=1))
    cfg = tiny_config.model.to_dict()
    cfg.update(hidden_size=60, num_heads=4, head_dim=16)  # 60 does not divide over fsdp=8
    specs = rules.param_specs(cfg, m, "fsdp")
    assert specs["llm"]["layers"]["self_attn"]["q_proj"]["kernel"] == P(None, None, None)
    with pytest.raises(ValueError, match="num_kv_heads=2 does not divide over tensor=4"):
        rules.check_model(tiny_config.model, mesh_lib.make_mesh(mesh_lib.mesh_config(data=2, tensor=4)), "fsdp_tp")
