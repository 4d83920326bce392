"""Load plain-Python ml_collections configs by path or built-in name, with `x.y=z` overrides.

    cfg = load("configs/neo_2b.py:pt")          # path, with the config argument (the stage)
    cfg = load("neo_9b:sft", ["model.dtype=bfloat16"])
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve(spec: str) -> tuple[Path, str | None]:
    """'configs/neo_2b.py:pt' | 'neo_2b:pt' | 'ablations/rope_h' -> (file, argument)."""
    path, _, arg = spec.partition(":")
    candidates = [Path(path), CONFIG_DIR / path, CONFIG_DIR / f"{path}.py"]
    for c in candidates:
        if c.is_file():
            return c, (arg or None)
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
    raise FileNotFoundError(f"config {path!r} not found (tried {[str(c) for c in candidates]}); built-in: {names}")


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
    file, arg = resolve(spec)
    module_spec = importlib.util.spec_from_file_location(f"neo_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    for d in (str(CONFIG_DIR), str(file.resolve().parent)):  # configs import their siblings (common.py)
        if d not in sys.path:
            sys.path.insert(0, d)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    apply_overrides(cfg, overrides)
    return cfg


def _parse(text: str, old):
    if isinstance(old, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(old, bool) and not isinstance(value, bool):
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise ValueError(f"expected a bool, got {text!r}")
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if old is not None and not isinstance(value, type(old)) and not isinstance(old, (tuple, list)):
        raise ValueError(f"expected {type(old).__name__}, got {text!r}")
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> None:
    """Apply 'a.b=value' strings in place; an unknown key is an error naming it."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        *parents, leaf = key.strip().split(".")
        node = cfg
        for p in parents:
            if p not in node:
                raise KeyError(f"override {item!r}: config has no section {p!r} (has {sorted(node.keys())})")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"override {item!r}: no key {leaf!r} in {'.'.join(parents) or 'config'} "
                           f"(has {sorted(node.keys())})")
        old = node[leaf]
        try:
            node[leaf] = _parse(text.strip(), old)
        except ValueError as e:
            raise ValueError(f"override {item!r}: {e}") from None
