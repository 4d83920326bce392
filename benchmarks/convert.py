"""Peak host memory and time to export and re-import a NEO-2.2B-shaped random checkpoint (bfloat16).

    python benchmarks/convert.py                 # full NEO-2.2B shapes (40 layers, ~5.2 GB in bf16)
    python benchmarks/convert.py --layers 8      # same widths, fewer layers (state it when you quote numbers)

Each phase runs in its own process so its peak RSS (ru_maxrss) is its own:
  export: random params (one leaf at a time, deterministic per leaf) -> export_hf -> /tmp
  import: import_hf from that directory, then a bit-exact check against regenerated leaves.
Prints time, peak RSS and peak RSS / checkpoint bytes (target: <= ~1.3). Cleans up the directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def model_config(layers: int | None):
    from neo_jax import config as config_lib
    from neo_jax.model.config import ModelConfig

    cfg = ModelConfig.from_dict(config_lib.load("neo_2b:pt").model)
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16")
    if layers:
        pre = max(1, layers * cfg.num_prebuffer_layers // cfg.num_layers)
        cfg = dataclasses.replace(cfg, num_prebuffer_layers=pre, num_llm_layers=layers - pre)
    return cfg


def leaf(path, shape):
    """A deterministic random bf16 leaf (from raw bits, finite values) seeded by its path."""
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(zlib.crc32("/".join(path).encode()))
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & np.uint16(0xBFFF)  # exponent < max: finite
    return bits.view(ml_dtypes.bfloat16)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def phase_export(out, layers):
    import jax

    from neo_jax.convert import neo_hf
    from neo_jax.convert.common import leaf_paths, nbytes, tree_set

    cfg = model_config(layers)
    params = {}
    for path, s in leaf_paths(neo_hf.param_shapes(cfg)):
        tree_set(params, path, jax.device_put(leaf(path, s.shape)))
    size = nbytes(params)
    base = peak_rss()
    t = time.time()
    info = neo_hf.export_hf(params, cfg, out)
    return {"seconds": time.time() - t, "peak_rss": peak_rss(), "rss_before": base, "bytes": size,
            "files": len(info["files"])}


def phase_import(out, layers):
    import numpy as np

    from neo_jax.convert import neo_hf
    from neo_jax.convert.common import leaf_paths, nbytes

    t = time.time()
    params, cfg = neo_hf.import_hf(out)
    seconds = time.time() - t
    peak = peak_rss()
    assert neo_hf.hf_config(cfg, "bfloat16") == neo_hf.hf_config(model_config(layers), "bfloat16"), cfg
    for path, x in leaf_paths(params):  # bit-exact against the regenerated leaf
        want = leaf(path, x.shape)
        assert np.array_equal(np.asarray(x).view(np.uint16), want.view(np.uint16)), path
    return {"seconds": seconds, "peak_rss": peak, "bytes": nbytes(params)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="total layers (default: NEO-2.2B's 40)")
    ap.add_argument("--phase", choices=("export", "import"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        fn = phase_export if args.phase == "export" else phase_import
        print("RESULT " + json.dumps(fn(args.dir, args.layers)))
        return
    work = tempfile.mkdtemp(prefix="neo_convert_bench_", dir="/tmp")
    out = os.path.join(work, "neo-hf")
    results = {}
    try:
        for phase in ("export", "import"):
            cmd = [sys.executable, __file__, "--phase", phase, "--dir", out]
            if args.layers:
                cmd += ["--layers", str(args.layers)]
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{phase} failed:\n{proc.stderr[-3000:]}")
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            results[phase] = json.loads(line[len("RESULT "):])
        disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cfg = model_config(args.layers)
    size = results["export"]["bytes"]
    print(f"NEO-2.2B shapes, {cfg.num_layers} layers ({cfg.num_prebuffer_layers} pre-buffer), bfloat16: "
          f"checkpoint {size / 1e9:.2f} GB in {results['export']['files']} file(s), {disk / 1e9:.2f} GB on disk")
    print(f"{'phase':<8} {'seconds':>8} {'GB/s':>6} {'peak RSS GB':>12} {'peak RSS / ckpt':>16}")
    for phase, r in results.items():
        print(f"{phase:<8} {r['seconds']:8.1f} {size / 1e9 / r['seconds']:6.2f} {r['peak_rss'] / 1e9:12.2f} "
              f"{r['peak_rss'] / size:16.2f}")
    print(f"(export process RSS with the params loaded, before exporting: {results['export']['rss_before'] / 1e9:.2f} "
          f"GB = {results['export']['rss_before'] / size:.2f} x; import was checked bit-exact)")


if __name__ == "__main__":
    main()
