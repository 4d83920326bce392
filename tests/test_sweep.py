"""`neo-jax sweep`: grid files load into valid configs; run order, overrides, stage chaining, resume; emitted
commands; the collected Table-3-shaped Markdown / CSV (mean ± std over seeds, steps, seeds)."""
import csv
import json
import os

import pytest

from neo_jax import cli
from neo_jax import config as config_lib
from neo_jax.eval import sweep
from neo_jax.model.config import ModelConfig

GRIDS = os.path.join(os.path.dirname(__file__), "..", "configs", "ablations")


@pytest.mark.parametrize("name", ["cpu_repro", "table3"])
def test_grid_files_make_valid_configs(name):
    grid = sweep.load_grid(os.path.join(GRIDS, f"{name}.py"))
    for run in grid["runs"]:
        prev = ""
        for stage in grid["stages"]:
            cfg = config_lib.load(f"{grid['base']}:{stage}", sweep.stage_overrides(grid, run, 1, stage, prev))
            m = ModelConfig.from_dict(cfg.model)  # validates rope_kind / mask_kind / depths
            assert cfg.seed == 1 and cfg.train.total_steps == grid["steps"][stage]
            prev = "/w/prev"
    ids = [r["id"] for r in grid["runs"]]
    if name == "cpu_repro":
        assert ids == ["A", "B", "D", "G", "H", "I", "PB0", "PB4"] and grid["seeds"] == [0, 1, 2]
        assert (m.num_prebuffer_layers, m.num_llm_layers) == (4, 4)  # PB4: 4 pre-buffer layers before the same LLM


def _grid():
    return {"base": "demo", "stages": ["mt", "sft"], "steps": {"mt": 3, "sft": 2}, "seeds": [0, 1],
            "eval": "synthetic:8", "runs": [
                {"id": "A", "attention": "Causal", "rope": "1D-RoPE",
                 "overrides": {"model.mask_kind": "causal", "model.rope_kind": "1d"}},
                {"id": "H", "attention": "Mixed", "rope": "Native-RoPE", "overrides": {}}]}


ACC = {("A", 0): (0.5, 0.25), ("A", 1): (0.7, 0.35), ("H", 0): (0.9, 0.8), ("H", 1): (1.0, 0.6)}  # color, count


def test_run_grid_trains_in_order_resumes_and_collects(tmp_path):
    trained, evaluated = [], []

    def fake_train(cfg, workdir):
        trained.append((workdir, cfg.model.rope_kind, cfg.model.mask_kind, cfg.seed, cfg.data.seed,
                        cfg.train.total_steps, cfg.init_from))

    def fake_eval(ckpt, data, out):
        run, seed = os.path.basename(os.path.dirname(ckpt)).split("_seed")
        color, count = ACC[(run, int(seed))]
        evaluated.append((ckpt, data))
        with open(out, "w") as f:
            json.dump({"summary": {"synthetic_test": {"accuracy": (color + count) / 2, "chance": 0.2, "by_category": {
                "color": {"accuracy": color, "n": 4, "chance": 0.15}, "count": {"accuracy": count, "n": 4,
                                                                                "chance": 0.25}}}}}, f)

    w = str(tmp_path)
    sweep.run_grid(_grid(), w, train_fn=fake_train, eval_fn=fake_eval, log=lambda m: None)
    a0 = os.path.join(w, "A_seed0")
    assert trained[:2] == [(os.path.join(a0, "mt"), "1d", "causal", 0, 0, 3, ""),
                           (os.path.join(a0, "sft"), "1d", "causal", 0, 0, 2, os.path.join(a0, "mt"))]
    assert [t[1:4] for t in trained[4:6]] == [("native", "mixed", 0)] * 2 and len(trained) == 8
    assert evaluated[0] == (os.path.join(a0, "sft"), "synthetic:8")
    sweep.run_grid(_grid(), w, train_fn=fake_train, eval_fn=fake_eval, log=lambda m: None)
    assert len(trained) == 8  # finished runs are not trained again

    table = sweep.collect(_grid(), w)
    lines = table["markdown"].splitlines()
    assert lines[0] == "| ID | Attention | RoPE | color | count | Avg. | steps | seeds |"
    assert lines[2] == "| A | Causal | 1D-RoPE | 60.0 ± 14.1 | 30.0 ± 7.1 | **45.0 ± 10.6** | 3 mt+2 sft | 0,1 |"
    assert lines[3].startswith("| H | Mixed | Native-RoPE | 95.0 ± 7.1 | 70.0 ± 14.1 | **82.5 ± 3.5**")
    assert lines[4] == "| - | - | chance | 15.0 | 25.0 | 20.0 | | |"
    with open(os.path.join(w, "table.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["seed"], r["steps"], r["color"], r["avg"]) for r in rows][:2] == [
        ("A", "0", "mt:3+sft:2", "50.00", "37.50"), ("A", "1", "mt:3+sft:2", "70.00", "52.50")]
    os.remove(os.path.join(w, "H_seed1", "eval.json"))
    assert sweep.collect(_grid(), w)["missing"] == ["H_seed1"]


def test_emit_and_cli(tmp_path, capsys):
    grid_file = tmp_path / "g.py"
    grid = {**_grid(), "overrides": {"train.lr": 0.002, "model.rope_kind": "native"}}  # the run's own win
    grid_file.write_text(f"def get_grid():\n    return {grid!r}\n")
    w = str(tmp_path / "runs")
    assert cli.main(["sweep", "--grid", str(grid_file), "--workdir", w, "--emit", "--prefix", "launch", "--only", "A"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("launch '") for line in lines)
    assert "--config.model.rope_kind=1d" in lines[0] and "rope_kind=native" not in lines[0]
    assert "--config.train.lr=0.002" in lines[0] and "--config.seed=0" in lines[0]
    assert f"--config.init_from={w}/A_seed0/mt" in lines[0] and lines[0].count("neo-jax train") == 2
    assert f"neo-jax eval --ckpt {w}/A_seed0/sft --data synthetic:8 --out {w}/A_seed0/eval.json" in lines[0]
    meta = json.load(open(os.path.join(w, "A_seed1", "run.json")))
    assert meta["seed"] == 1 and meta["overrides"]["train.lr"] == 0.002
    assert cli.main(["sweep", "--grid", str(grid_file), "--workdir", w, "--collect"]) == 0
    assert "Missing (not yet evaluated): A_seed0, A_seed1" in capsys.readouterr().out
    assert cli.main(["sweep", "--grid", str(tmp_path / "no.py"), "--workdir", w]) == 2
    assert cli.main(["sweep", "--grid", str(grid_file), "--workdir", w, "--only", "Z"]) == 2
