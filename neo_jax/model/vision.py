"""Patch Embedding Layer (PEL, NEO_PAPER.md §1.2, official NEOVisionEmbeddings).

patches [B, P, 768] ((C, row, col) inside a 16x16 patch; each consecutive group of 4 is one 2x2 merge window
(0,0),(0,1),(1,0),(1,1)) -> Conv1 as Dense 768 -> vision_dim (+bias) -> exact GELU -> 2D interleaved rotary
by (row, col) -> Conv2 (2x2, stride 2) as one Dense over the 4 grouped patches (4*vision_dim -> hidden, +bias).

Weight layout: `patch_embedding.kernel[(c*16 + i)*16 + j, o] = conv1.weight[o, c, i, j]` and
`dense_embedding.kernel[(2*di + dj)*vision_dim + c, o] = conv2.weight[o, c, di, dj]`.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from neo_jax.model import rope
from neo_jax.model.config import ModelConfig
from neo_jax.model.layers import Dense, torch_default_init


class PatchEmbedding(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, patches, patch_positions):
        """Returns [B, P/4, hidden]: one embedding per merge window, in window order."""
        c = self.cfg
        b, p, _ = patches.shape
        fan1, fan2 = c.patch_dim, c.vision_dim * c.merge_size ** 2
        x = Dense(c.vision_dim, ("patch", "vision"), c, use_bias=True, name="patch_embedding",
                  kernel_init=torch_default_init(fan1), bias_init=torch_default_init(fan1))(patches)
        x = nn.gelu(x, approximate=False)
        x = rope.apply_vision_rope_2d(x, patch_positions, c.rope_theta_vision)
        x = x.reshape(b, p // c.merge_size ** 2, fan2)
        return Dense(c.hidden_size, ("vision_merge", "embed"), c, use_bias=True, name="dense_embedding",
                     kernel_init=torch_default_init(fan2), bias_init=torch_default_init(fan2))(x)


def scatter_image_embeddings(word_emb, image_emb, tokens, img_context_id: int):
    """Overwrite word embeddings at `<IMG_CONTEXT>` with the image embeddings, static shapes.

    The k-th context token of a row takes merge window k: a gather by the running context count.
    word_emb [B, L, E]; image_emb [B, W, E]; tokens [B, L].
    """
    is_ctx = tokens == img_context_id
    if image_emb.shape[1] == 0:
        return word_emb
    idx = jnp.clip(jnp.cumsum(is_ctx, axis=1) - 1, 0, image_emb.shape[1] - 1)
    gathered = jnp.take_along_axis(image_emb, idx[..., None], axis=1)
    return jnp.where(is_ctx[..., None], gathered.astype(word_emb.dtype), word_emb)
