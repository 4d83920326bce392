"""The sharded train state and the one-`jax.jit` train step (DESIGN.md "Sharding", "Stages").

    state, shardings = create_train_state(cfg, mesh, jax.random.PRNGKey(cfg.seed))   # already sharded
    train_step = make_train_step(cfg, mesh, shardings)
    state, metrics = train_step(state, batch)    # batch: the DESIGN.md dict, leading dim = global rows

The loss is sum(w * CE) / sum(w) over the whole global batch (`NEO.loss` returns the
two sums), so `train.grad_accum = k` micro-batches give the same update as one big batch: gradients of
the weighted sums are accumulated over a `lax.scan` and divided once. Only trainable leaves are
differentiated (frozen ones enter the loss as constants), and frozen leaves are returned as they came in,
so they stay bit-identical. Logical-axis rules and the mesh are active while the step is traced, so the
model's activation constraints apply.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.tree_util import DictKey

from neo_jax.model.init import init_params
from neo_jax.model.neo import NEO
from neo_jax.parallel import rules as R
from neo_jax.train import optim


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: updates applied so far
    params: dict
    opt_state: optax.OptState
    rng: jnp.ndarray  # uint32 [2] PRNG key, split every step (for stochastic layers / sampling)


def strategy_of(cfg) -> str:
    return cfg.mesh.strategy if "mesh" in cfg else "fsdp"


@contextlib.contextmanager
def sharding_context(mesh, strategy: str):
    """Mesh + logical-axis rules, for tracing / lowering anything that calls the model."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(R.rules(strategy)):
        yield


def _dict_path(path):
    return tuple(k.key for k in path if isinstance(k, DictKey))


def opt_state_shardings(abstract_opt_state, param_shardings, abstract_params, mesh):
    """Shard every optimizer-state leaf like the parameter it mirrors (matched by the trailing dict path
    and shape); scalars such as Adam's `count` are replicated."""
    by_path = {}
    for path, s in jax.tree_util.tree_leaves_with_path(param_shardings):
        by_path[_dict_path(path)] = s
    shapes = {_dict_path(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}

    def one(path, leaf):
        names = _dict_path(path)
        for i in range(len(names)):
            if names[i:] in by_path and shapes[names[i:]] == leaf.shape:
                return by_path[names[i:]]
        return R.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _model_and_tx(cfg, params_like):
    mcfg = R.model_config(cfg.model)
    return mcfg, optim.make_optimizer(cfg.train, params_like, cfg.stage)


def _abstract(cfg, mesh):
    """(ModelConfig, optimizer, abstract params, abstract opt state, TrainState of shardings)."""
    strategy = strategy_of(cfg)
    mcfg = R.model_config(cfg.model)
    R.check_model(mcfg, mesh, strategy)
    abstract_params = jax.eval_shape(lambda: init_params(mcfg, jax.random.PRNGKey(0)))
    _, tx = _model_and_tx(cfg, abstract_params)
    p_shard = R.param_shardings(mcfg, mesh, strategy)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    rep = R.replicated(mesh)
    shardings = TrainState(step=rep, params=p_shard,
                           opt_state=opt_state_shardings(abstract_opt, p_shard, abstract_params, mesh), rng=rep)
    return mcfg, tx, abstract_params, abstract_opt, shardings


def abstract_train_state(cfg, mesh):
    """(TrainState of ShapeDtypeStructs carrying their shardings, TrainState of shardings), allocating
    nothing: for ahead-of-time compilation (`neo-jax plan`) and as a checkpoint restore target."""
    _, _, params, opt, shardings = _abstract(cfg, mesh)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt,
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings), shardings


def create_train_state(cfg, mesh, rng, params=None):
    """(TrainState, TrainState of NamedShardings), created directly on the mesh.

    params=None: fresh init inside `jax.jit(..., out_shardings=...)` (no host copy of the full model).
    Given params (a Qwen3 import, a previous stage): checked against the model's tree and placed.
    """
    mcfg, tx, abstract_params, _, shardings = _abstract(cfg, mesh)
    p_shard, rep = shardings.params, shardings.step
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)

    def from_params(p, key):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=key)

    with sharding_context(mesh, strategy_of(cfg)):
        if params is None:
            init_key, key = jax.random.split(rng)
            state = jax.jit(lambda k1, k2: from_params(init_params(mcfg, k1), k2),
                            out_shardings=shardings)(init_key, key)
        else:
            expected = jax.tree_util.tree_structure(abstract_params)
            if jax.tree_util.tree_structure(params) != expected:
                raise ValueError("given params do not match the model's parameter tree; expected the "
                                 f"structure of init_params(cfg.model): {expected}")
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(abstract_params)):
                if tuple(a.shape) != tuple(b.shape):
                    raise ValueError(f"param {jax.tree_util.keystr(path)} has shape {a.shape}, the model "
                                     f"expects {b.shape}")
            params = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), params, abstract_params)
            params = jax.device_put(params, p_shard)
            state = jax.jit(from_params, in_shardings=(p_shard, rep), out_shardings=shardings)(params, rng)
    return state, shardings


class _Step:
    """A jitted step that traces / lowers inside the mesh + rules context."""

    def __init__(self, jitted, mesh, strategy):
        self.jitted, self.mesh, self.strategy = jitted, mesh, strategy

    def __call__(self, *args):
        with sharding_context(self.mesh, self.strategy):
            return self.jitted(*args)

    def lower(self, *args):
        with sharding_context(self.mesh, self.strategy):
            return self.jitted.lower(*args)


def check_rows(batch, mesh, k: int = 1) -> None:
    """The global rows must split into k micro-batches that each divide over ("data", "fsdp")."""
    rows = batch["tokens"].shape[0]
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % k or (rows // k) % shards:
        raise ValueError(f"batch of {rows} rows: with train.grad_accum={k} each micro-batch must hold a multiple "
                         f"of data x fsdp = {shards} rows; set data.batch_size to a multiple of {k * shards}")


def _split_micro(batch, k: int):
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ... (each device keeps its rows)."""
    def one(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def _sums_and_grads(mcfg, params, mask, batch, k: int, shardings, mesh, chunk: int = 0):
    """(sum w*CE, sum w, grads of sum w*CE w.r.t. the trainable leaves (flat list))."""
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(mask)
    train_idx = [i for i, t in enumerate(flags) if t]

    def weighted(train_leaves, mb):
        full = list(leaves)
        for i, x in zip(train_idx, train_leaves):
            full[i] = x
        return NEO(mcfg).apply({"params": jax.tree.unflatten(treedef, full)}, mb, chunk, method=NEO.loss)

    grad_fn = jax.value_and_grad(weighted, has_aux=True)
    train_leaves = [leaves[i] for i in train_idx]
    if k == 1:
        (s, w), g = grad_fn(train_leaves, batch)
        return s, w, g, train_idx, treedef, leaves

    def body(carry, mb):
        s0, w0, g0 = carry
        (s, w), g = grad_fn(train_leaves, mb)
        return (s0 + s, w0 + w, jax.tree.map(jnp.add, g0, g)), None

    flat_shardings = jax.tree.leaves(shardings)
    zeros = [jax.lax.with_sharding_constraint(jnp.zeros(leaves[i].shape, jnp.float32), flat_shardings[i])
             for i in train_idx]
    micro = jax.lax.with_sharding_constraint(
        _split_micro(batch, k), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, R.BATCH_AXES)))
    (s, w, g), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros), micro)
    return s, w, g, train_idx, treedef, leaves


def make_train_step(cfg, mesh, state_shardings):
    """step_fn(state, batch) -> (state, metrics): one jit, explicit shardings, donated state.

    metrics (float32 scalars): loss, weight_sum, grad_norm (of the trainable gradients, before clipping),
    lr (used for this update), tokens (non-padding tokens in the batch).
    """
    strategy = strategy_of(cfg)
    mcfg, tx = _model_and_tx(cfg, state_shardings.params)
    mask = optim.trainable_mask(state_shardings.params, cfg.stage, cfg.train.get("trainable", "stage"))
    schedule = optim.lr_schedule(cfg.train)
    k = int(cfg.train.get("grad_accum", 1))
    chunk = int(cfg.train.get("loss_chunk", 0))

    def step(state, batch):
        check_rows(batch, mesh, k)
        s, w, g, train_idx, treedef, leaves = _sums_and_grads(mcfg, state.params, mask, batch, k,
                                                             state_shardings.params, mesh, chunk)
        denom = jnp.maximum(w, jnp.finfo(jnp.float32).tiny)
        g = [x.astype(jnp.float32) / denom for x in g]
        full = [jnp.zeros_like(x) for x in leaves]
        for i, x in zip(train_idx, g):
            full[i] = x.astype(leaves[i].dtype)
        grads = jax.tree.unflatten(treedef, full)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = optax.apply_updates(state.params, updates)
        params = jax.tree.map(lambda n, o, t: n if t else o, new, state.params, mask)
        rng, _ = jax.random.split(state.rng)
        metrics = {"loss": s / denom, "weight_sum": w, "grad_norm": optax.tree.norm(g),
                   "lr": schedule(state.step), "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    jitted = jax.jit(step, in_shardings=(state_shardings, R.batch_sharding(mesh)),
                     out_shardings=(state_shardings, R.replicated(mesh)), donate_argnums=0)
    return _Step(jitted, mesh, strategy)


def make_eval_step(cfg, mesh, state_shardings):
    """eval_fn(state, batch) -> {loss, loss_sum, weight_sum}: no update (sums aggregate exactly)."""
    mcfg = R.model_config(cfg.model)

    def evaluate(state, batch):
        s, w = NEO(mcfg).apply({"params": state.params}, batch, int(cfg.train.get("loss_chunk", 0)),
                               method=NEO.loss)
        return {"loss": s / jnp.maximum(w, jnp.finfo(jnp.float32).tiny), "loss_sum": s, "weight_sum": w}

    jitted = jax.jit(evaluate, in_shardings=(state_shardings, R.batch_sharding(mesh)),
                     out_shardings=R.replicated(mesh))
    return _Step(jitted, mesh, strategy_of(cfg))
