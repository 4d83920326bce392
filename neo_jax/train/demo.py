"""`neo-jax demo`: NEO's three-stage recipe end to end on the CPU, from scratch, with no files or network.

Runs configs/demo.py's stages in order, each in `<workdir>/<stage>` (a stage that already finished is
skipped, an interrupted one resumes), `mt` starting from `pt`'s parameters and `sft` from `mt`'s, then
answers questions about held-out synthetic scenes (the test split, minus the few scenes that the training
split happens to contain too) with greedy decoding and prints the accuracy per question type next to chance
level.
"""
from __future__ import annotations

import os
import time

STAGES = ("pt", "mt", "sft")


def training_scenes(cfgs) -> set:
    """Scene keys (`SyntheticSource.scene_key`) of every synthetic training record the configs can draw."""
    from neo_jax.data.synthetic import QTYPES, SyntheticSource

    keys = set()
    for cfg in cfgs:
        for spec in cfg.data.sources:
            if spec.get("kind") == "synthetic":
                src = SyntheticSource(spec.get("split", "train"), spec.get("size", 10_000), spec.get("seed", 0),
                                      tuple(spec.get("qtypes", QTYPES)))
                keys.update(src.scene_key(i) for i in range(len(src)))
    return keys


def heldout_records(eval_size: int, qtypes, *, seed: int = 0, exclude=frozenset()) -> tuple[list, int]:
    """The first `eval_size` test-split records whose scene (image + question) is not in `exclude`, and
    how many were passed over. Simple scenes recur by chance across independently drawn splits; skipping
    them makes every scored question one the model never saw."""
    from neo_jax.data import synthetic

    source = synthetic.SyntheticSource("test", 100 * eval_size, seed, qtypes)
    idx, skipped = [], 0
    for i in range(len(source)):
        if len(idx) == eval_size:
            break
        if source.scene_key(i) in exclude:
            skipped += 1
        else:
            idx.append(i)
    return [source[i] for i in idx], skipped


def evaluate(workdir: str, eval_size: int, qtypes, *, batch: int = 120, seed: int = 0,
             exclude=frozenset()) -> dict:
    """Greedy answers of the latest checkpoint in `workdir` on `eval_size` held-out questions (test-split
    scenes not in `exclude`). Returns {qtype: (correct, total)}. An answer counts when its first word equals
    the reference."""
    from neo_jax.data.tokenizer import load_tokenizer
    from neo_jax.infer.cli import answer, load_model

    model_cfg, params, saved = load_model(workdir)
    data = saved["data"]
    tok = load_tokenizer(data["tokenizer"])
    records, _ = heldout_records(eval_size, qtypes, seed=seed, exclude=exclude)
    results = {q: [0, 0] for q in qtypes}
    for lo in range(0, eval_size, batch):
        chunk = records[lo:lo + batch]
        chunk = chunk + [chunk[-1]] * (batch - len(chunk)) if len(records) > batch else chunk  # one shape
        questions = [r["conversations"][0]["value"].replace("<image>\n", "") for r in chunk]
        answers = answer(model_cfg, params, tok, questions, [r["images"] for r in chunk],
                         min_pixels=int(data["min_pixels"]), max_pixels=int(data["max_pixels"]), max_new_tokens=6)
        for r, a in list(zip(chunk, answers))[:min(batch, eval_size - lo)]:
            q, ref = r["meta"]["qtype"], r["meta"]["answer"]
            words = a.strip().rstrip(".").split()
            results[q][0] += int(bool(words) and words[0].lower() == ref.lower())
            results[q][1] += 1
    return {q: tuple(v) for q, v in results.items()}


def report(results: dict) -> tuple[str, float, float]:
    """A table of accuracy vs chance per question type; returns (text, accuracy, chance) overall."""
    from neo_jax.data.synthetic import chance

    lines = [f"{'question type':<14}{'n':>5}{'accuracy':>10}{'chance':>9}"]
    correct = total = 0
    chance_sum = 0.0
    for q, (c, n) in results.items():
        if not n:
            continue
        lines.append(f"{q:<14}{n:>5}{c / n:>10.1%}{chance(q):>9.1%}")
        correct, total, chance_sum = correct + c, total + n, chance_sum + chance(q) * n
    acc, base = correct / max(total, 1), chance_sum / max(total, 1)
    lines.append(f"{'all':<14}{total:>5}{acc:>10.1%}{base:>9.1%}")
    return "\n".join(lines), acc, base


def run(workdir: str, *, eval_size: int = 600, overrides=(), spec: str = "demo") -> bool:
    """Trains the three stages and evaluates; returns True when accuracy beats chance."""
    from neo_jax import config
    from neo_jax.train.loop import train

    t0 = time.perf_counter()
    prev = ""
    cfgs = []
    for stage in STAGES:
        cfg = config.load(f"{spec}:{stage}", overrides)
        cfgs.append(cfg)
        if prev:
            cfg.init_from = prev
        stage_dir = os.path.join(workdir, stage)
        ts = time.perf_counter()
        summary = train(cfg, stage_dir, log_prefix=stage)
        rows = summary["history"]
        if rows:
            print(f"[{stage}] steps {summary['start_step']}->{summary['step']}: loss {rows[0]['loss']:.3f} "
                  f"(step {rows[0]['step']}) -> {rows[-1]['loss']:.3f} (step {rows[-1]['step']}) in "
                  f"{time.perf_counter() - ts:.0f} s; checkpoint in {summary['checkpoint']}", flush=True)
        else:
            print(f"[{stage}] already trained ({summary['step']} steps) in {stage_dir}", flush=True)
        if summary["preempted"]:
            print("interrupted: rerun the same command to continue")
            return False
        prev = stage_dir
    qtypes = tuple(cfg.get("eval_qtypes", ())) or _default_qtypes()
    seen = training_scenes(cfgs)
    _, skipped = heldout_records(eval_size, qtypes, exclude=seen)
    results = evaluate(prev, eval_size, qtypes, exclude=seen)
    text, acc, base = report(results)
    from neo_jax.data.synthetic import ANSWERS

    omitted = [q for q in ANSWERS if q not in qtypes]
    print(f"\nheld-out synthetic questions (test split; {skipped} test scenes that also occur in the training "
          f"data passed over), greedy answers of the sft model (captions are trained, not scored"
          f"{'; not scored: ' + ', '.join(omitted) if omitted else ''}):\n{text}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s: accuracy {acc:.1%} vs chance {base:.1%}")
    return acc > base


def _default_qtypes():
    from neo_jax.data.synthetic import ANSWERS

    return tuple(ANSWERS)


if __name__ == "__main__":  # python -m neo_jax.train.demo [workdir]
    import sys

    sys.exit(0 if run(sys.argv[1] if len(sys.argv) > 1 else "neo_demo") else 1)
