"""Random packed batches that follow the batch contract (documents, images, padding), for tests."""
import numpy as np

from neo_jax.model.rope import native_positions


def make_batch(cfg, seed=0, batch_size=2, seq_len=64, patch_budget=32, max_docs=3, pad=True):
    rng = np.random.default_rng(seed)
    ctx, start, end = cfg.img_context_id, cfg.img_start_id, cfg.img_end_id
    text = lambda n: list(rng.integers(1, min(cfg.vocab_size, ctx) - 1, n))  # noqa: E731
    rows = {k: [] for k in ("tokens", "segment_ids", "positions", "patches", "patch_positions")}
    for _ in range(batch_size):
        toks, segs, pos, patches, ppos = [], [], [], [], []
        budget = patch_budget // 4
        for doc in range(1, max_docs + 1):
            t, grids = text(rng.integers(2, 6)), []
            if budget and rng.random() < 0.8:
                r, c = int(rng.integers(1, 3)), int(rng.integers(1, 4))
                if r * c <= budget:
                    budget -= r * c
                    grids.append([r, c])
                    t += [start] + [ctx] * (r * c) + [end]
                    # 16-px patches of the (2r x 2c) patch grid, grouped by 2x2 merge windows.
                    for wr in range(r):
                        for wc in range(c):
                            for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
                                ppos.append([2 * wr + dr, 2 * wc + dc])
                                patches.append(rng.normal(size=cfg.patch_dim))
            t += text(rng.integers(1, 6))
            if len(toks) + len(t) > seq_len - (4 if pad else 0):
                break
            toks += t
            segs += [doc] * len(t)
            pos += native_positions(np.array(t), np.array(grids).reshape(-1, 2), img_start_id=start,
                                    img_context_id=ctx).tolist()
        n = seq_len - len(toks)
        rows["tokens"].append(toks + [0] * n)
        rows["segment_ids"].append(segs + [0] * n)
        rows["positions"].append(pos + [[0, 0, 0]] * n)
        m = patch_budget - len(patches)
        rows["patches"].append(patches + [np.zeros(cfg.patch_dim)] * m)
        rows["patch_positions"].append(ppos + [[0, 0]] * m)
    b = {k: np.array(v) for k, v in rows.items()}
    b["patches"] = b["patches"].reshape(batch_size, patch_budget, cfg.patch_dim)
    b["patch_positions"] = b["patch_positions"].reshape(batch_size, patch_budget, 2)
    b = {k: v.astype(np.float32 if k == "patches" else np.int32) for k, v in b.items()}
    # Targets: next token inside the document; weights on text targets only.
    nxt = np.concatenate([b["tokens"][:, 1:], np.zeros((batch_size, 1), np.int32)], 1)
    same = np.concatenate([b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1],
                           np.zeros((batch_size, 1), bool)], 1) & (b["segment_ids"] > 0)
    b["targets"] = np.where(same, nxt, 0).astype(np.int32)
    b["loss_weights"] = (same & (nxt != ctx)).astype(np.float32)
    return b
