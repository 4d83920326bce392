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
