"""`neo-jax plan` in a subprocess (it sets its own fake device count): memory shrinks as FSDP grows."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_plan_memory_shrinks_with_fsdp():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NEO_PLAN_DEVICES")}
    cmd = [sys.executable, "-m", "neo_jax.cli", "plan", "--config", "tiny:sft", "--json",
           "--mesh", "data=8", "--mesh", "fsdp=8",
           "--batch-size", "8", "--seq-len", "32", "--patch-budget", "16"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["mesh"] for r in rows] == ["data=8,fsdp=1,tensor=1", "data=1,fsdp=8,tensor=1"]
    assert all(r["devices"] == 8 for r in rows)
    params = [r["params_bytes"] for r in rows]
    opt = [r["opt_bytes"] for r in rows]
    peak = [r["peak_bytes"] for r in rows]
    # fsdp=8 holds 1/8 of every evenly divisible leaf (norm scales stay replicated)
    assert params[1] < params[0] / 4 and opt[1] < opt[0] / 4, (params, opt)
    assert peak[1] < peak[0], peak
    assert rows[0]["config_flops"] > 0 and rows[0]["xla_flops"] > 0


def test_flop_counts_follow_the_mask(tiny_config):
    import numpy as np

    from neo_jax.model.mask import dense_mask
    from neo_jax.parallel.rules import model_config
    from neo_jax.train import flops
    from tests.batches import make_batch

    mcfg = model_config(tiny_config.model)
    b = make_batch(mcfg, seed=1, batch_size=3, seq_len=64, patch_budget=32)
    exact = flops.attention_pairs(b["segment_ids"], b["positions"])
    assert exact == int(np.asarray(dense_mask(b["segment_ids"], b["positions"], xp=np)).sum())
    tiled = flops.attention_pairs(b["segment_ids"], b["positions"], tile=16)
    assert exact <= tiled <= 3 * 64 * 64 and tiled % 256 == 0
    f = flops.batch_flops(mcfg, b)
    n_img = int((b["tokens"] == mcfg.img_context_id).sum())
    tokens = int((b["segment_ids"] != 0).sum())
    assert f["matmul"] == 6 * (flops.token_matmul_params(mcfg) * tokens + flops.image_token_matmul_params(mcfg) * n_img)
    assert f["attention"] == flops.attention_flops_per_pair(mcfg) * exact
    assert flops.mfu(1e12, 1.0, 4, 1e12) == 0.25 and flops.mfu(1e12, 1.0, 4, None) is None


def test_matmul_params_match_the_model(tiny_config):
    import jax

    from neo_jax.model.init import init_params
    from neo_jax.parallel.rules import model_config
    from neo_jax.train import flops

    mcfg = model_config(tiny_config.model)
    p = jax.eval_shape(lambda: init_params(mcfg, jax.random.PRNGKey(0)))
    stack = sum(x.size for s in ("prebuffer", "llm") for path, x in jax.tree_util.tree_leaves_with_path(p[s])
                if path[-1].key == "kernel")
    assert flops.token_matmul_params(mcfg) == stack + p["lm_head"]["kernel"].size
    vision = p["vision"]
    per_window = vision["patch_embedding"]["kernel"].size * mcfg.merge_size ** 2 + vision["dense_embedding"]["kernel"].size
    assert flops.image_token_matmul_params(mcfg) == per_window
