"""Orbax checkpoints of a training run: params, optimizer state, step, RNG, data-iterator state, config.

    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    if ckpt.latest_step() is not None:
        state, data_state, saved_cfg = ckpt.restore(abstract_state)    # abstract: shapes + target shardings
    ...
    ckpt.save(step, state, data_state=it.get_state(), config=cfg)   # async; returns whether it saved
    ckpt.close()                                                    # waits for the last save

One step directory holds four items: `params` (so generate/convert/eval read only the weights), `state`
(the rest of the train state: step, optimizer state, RNG), `data` (one JSON file per process: each host
saves its own input-iterator position) and `config` (JSON). Saves are asynchronous: the device arrays are
copied off and written in a background thread while training continues.

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>` and renames it when complete
(local disks), or writes into the final directory and adds `commit_success.txt` last (object stores). It
writes the marker in both cases, so `all_steps` / `latest_step` also require it: a temporary directory, a
crash mid-save, or a partially copied run directory can never become the "latest" checkpoint. When a
writable Checkpointer opens the directory, Orbax deletes leftover temporary directories and step
directories without the marker are renamed to `<step>.uncommitted-<time>` (kept for inspection, so the
step can be saved again).

Restoring takes an abstract target (`jax.ShapeDtypeStruct`s carrying shardings), so a run can resume on
a different mesh: Orbax reads each shard of the target layout from the saved global arrays.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies
from orbax.checkpoint._src.path import atomicity

log = logging.getLogger(__name__)


def checkpoint_config() -> ml_collections.ConfigDict:
    """`config.checkpoint`: when to save and what to keep."""
    c = ml_collections.ConfigDict()
    c.every = 1000  # save every this many steps (and at the end, and on SIGTERM)
    c.keep = 3  # keep the last N checkpoints ...
    c.keep_every = 0  # ... plus every step that is a multiple of this (0: none)
    c.async_save = True  # write in a background thread while training continues
    return c


# ---------------------------------------------------------------------------------------------- data items


@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any  # JSON-serialisable iterator state of THIS process


@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


class DataStateHandler(ocp.CheckpointHandler):
    """Each process writes its own input-iterator state (`process_<i>-of-<n>.json`), as Grain's handler
    does, but from a state captured at save time (so async saves and prefetching cannot skew it)."""

    @staticmethod
    def _file(directory):
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory, args: DataStateSave):
        self._file(directory).write_text(json.dumps(args.state))

    def restore(self, directory, args: DataStateRestore | None = None):
        f = self._file(directory)
        if not f.exists():
            saved = sorted(p.name for p in epath.Path(directory).iterdir())
            raise FileNotFoundError(f"no data-iterator state {f.name} in {directory} (has {saved}); a "
                                    f"checkpoint restores its data position only with the same process count")
        return json.loads(f.read_text())

    def metadata(self, directory):
        return None


ocp.args.register_with_handler(DataStateHandler, for_save=True)(DataStateSave)
ocp.args.register_with_handler(DataStateHandler, for_restore=True)(DataStateRestore)


# ----------------------------------------------------------------------------------------------- preemption


class Preemption:
    """SIGTERM (TPU/GKE preemption, `kill`) sets a flag; the loop saves at the next step and exits.

    Single-process runs use a Python signal handler. Multi-process runs ask JAX's preemption sync point
    (through the Orbax manager), so that every host stops and saves at the same step."""

    def __init__(self, install: bool = True):
        self._event = threading.Event()
        self._previous = None
        if install and jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: will save a checkpoint and stop after the current step")
        self._event.set()

    def set(self):
        self._event.set()

    def reached(self, step: int, manager: ocp.CheckpointManager | None = None) -> bool:
        if self._event.is_set():
            return True
        if jax.process_count() > 1 and manager is not None:
            return bool(manager.reached_preemption(step))
        return False

    def restore_handler(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---------------------------------------------------------------------------------------------- checkpointer


def _split(state):
    """A train state -> (params, the rest with params=None). Works for flax struct dataclasses."""
    return state.params, state.replace(params=None)


def config_json(cfg) -> dict:
    """The run's config as a JSON-ready dict (tuples become lists)."""
    if cfg is None:
        return {}
    if isinstance(cfg, ml_collections.ConfigDict):
        return json.loads(cfg.to_json_best_effort())
    return json.loads(json.dumps(cfg, default=str))


def _set_aside_uncommitted(directory: epath.Path):
    """Renames step directories (plain integer names) that lack Orbax's commit marker."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.isdigit() and p.is_dir() and not (p / atomicity.COMMIT_SUCCESS_FILE).exists():
            aside = directory / f"{p.name}.uncommitted-{int(time.time())}"
            log.warning("checkpoint: step directory %s has no %s (an interrupted save or copy); moving it "
                        "to %s", p, atomicity.COMMIT_SUCCESS_FILE, aside.name)
            p.rename(aside)


class Checkpointer:
    """A CheckpointManager over `directory` with the schedule and retention of `config.checkpoint`."""

    def __init__(self, directory, cfg: ml_collections.ConfigDict | None = None, *, read_only: bool = False):
        cfg = cfg or checkpoint_config()
        if cfg.every <= 0 or cfg.keep <= 0 or cfg.keep_every < 0:
            raise ValueError(f"checkpoint.every={cfg.every} and checkpoint.keep={cfg.keep} must be > 0, "
                             f"checkpoint.keep_every={cfg.keep_every} >= 0")
        self.directory = absolute(directory)
        if not read_only and jax.process_index() == 0:
            _set_aside_uncommitted(self.directory)
        self.async_save = bool(cfg.async_save)
        keep = [policies.LatestN(cfg.keep)]
        if cfg.keep_every:
            keep.append(policies.EveryNSteps(cfg.keep_every))
        saving = None if read_only else policies.AnySavePolicy([
            policies.FixedIntervalPolicy(cfg.every), policies.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else 1,
            save_decision_policy=saving,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=bool(cfg.async_save),
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        absl = logging.getLogger("absl")
        level = absl.level
        if read_only:  # Orbax warns that a read-only directory is read-only
            absl.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("params", "state", "data", "config"),
                item_handlers={"params": ocp.StandardCheckpointHandler(), "state": ocp.StandardCheckpointHandler(),
                               "data": DataStateHandler(), "config": ocp.JsonCheckpointHandler()})
        finally:
            absl.setLevel(level)

    # -- queries
    def all_steps(self) -> list[int]:
        """Complete steps, re-read from disk: temporary or uncommitted directories never count."""
        self.manager.reload()
        return sorted(s for s in self.manager.all_steps()
                      if (self.directory / str(s) / atomicity.COMMIT_SUCCESS_FILE).exists())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    # -- save / restore
    def save(self, step: int, state, *, data_state=None, config=None, force: bool = False) -> bool:
        """Saves (asynchronously) if the schedule says so, or always with `force`. Returns whether it saved."""
        step = int(step)
        if step in self.manager.all_steps():
            return False  # already saved (e.g. the schedule hit the final step)
        params, rest = _split(state)
        items = dict(params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(rest),
                     config=ocp.args.JsonSave(config_json(config)))
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s (async=%s)", step, self.directory, self.async_save)
        return saved

    def restore(self, abstract_state, step: int | None = None, *, data: bool = True):
        """-> (state, data_state or None, config dict). `abstract_state` holds jax.ShapeDtypeStructs with
        the target shardings (see `abstract`); arrays come back laid out as those say."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        a_params, a_rest = _split(abstract_state)
        items = dict(params=ocp.args.StandardRestore(a_params), state=ocp.args.StandardRestore(a_rest),
                     config=ocp.args.JsonRestore())
        has_data = (self.directory / str(step) / "data").exists()
        if data and has_data:
            items["data"] = DataStateRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = out["state"].replace(params=out["params"])
        return state, (out["data"] if data and has_data else None), out["config"]

    def restore_params(self, step: int | None = None, shardings=None):
        """Only the parameters (no optimizer state is read). shardings: a pytree matching the params, one
        Sharding for all, or None for the first local device."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        meta = self.manager.item_metadata(step)["params"]
        meta = getattr(meta, "tree", meta)
        if shardings is None:
            shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if isinstance(shardings, jax.sharding.Sharding):
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=shardings), meta)
        else:
            target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), meta, shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        return out["params"]

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract(state, shardings=None):
    """Shapes/dtypes of a pytree with target shardings (a matching pytree, or taken from the arrays)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def absolute(path) -> epath.Path:
    """A local path made absolute (Orbax refuses relative ones, e.g. `--workdir neo_demo`); gs:// etc. as is."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def find_checkpoint_dir(path) -> epath.Path:
    """Accepts a workdir (holding `checkpoints/`) or a checkpoints directory itself."""
    path = absolute(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise FileNotFoundError(f"checkpoint directory {path} does not exist; pass a training workdir or its "
                            f"checkpoints/ directory")


def load_params(ckpt_dir, step: int | None = None, shardings=None):
    """Parameters of the latest (or given) step of a run: `ckpt_dir` is a workdir or its checkpoints/.
    Returns (params, config dict saved with them)."""
    ckpt = Checkpointer(find_checkpoint_dir(ckpt_dir), read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
        return ckpt.restore_params(step, shardings), ckpt.restore_config(step)
    finally:
        ckpt.close()
