"""The model's static configuration (hashable, so Flax modules and jit can close over it)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from neo_jax.model.rope import ROPE_KINDS

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128  # T part of q/k and the width of v; H and W get head_dim/2 each
    num_prebuffer_layers: int = 12
    num_llm_layers: int = 28
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6  # T
    rope_theta_hw: float = 1e4  # H and W
    tie_word_embeddings: bool = True
    # Patch embedding layer (PEL).
    vision_dim: int = 1024
    patch_size: int = 16
    merge_size: int = 2
    rope_theta_vision: float = 1e4  # 1e3 in the official training code's ModelArguments
    # Special tokens (Qwen3 tokenizer + NEO's added tokens).
    img_context_id: int = 151669
    img_start_id: int = 151670
    img_end_id: int = 151671
    # Ablations / numerics.
    hw_branch: bool = True  # False = plain Qwen3 attention (no H/W channels): the "LLM only" reference
    mask_kind: str = "mixed"  # or "causal"
    rope_kind: str = "native"  # Table 3 variants: native | 1d | il | mrope | mmrope | video (docs/rope_variants.md)
    attention_impl: str = "auto"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 4 (H/W halves of rotate-half pairs)")
        if self.vision_dim % 4:
            raise ValueError(f"vision_dim={self.vision_dim} must be a multiple of 4 (2D interleaved rotary)")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {tuple(DTYPES)}")
        if self.mask_kind not in ("mixed", "causal"):
            raise ValueError(f"mask_kind={self.mask_kind!r}; choose 'mixed' or 'causal'")
        if self.rope_kind not in ROPE_KINDS:
            raise ValueError(f"rope_kind={self.rope_kind!r}; choose one of {ROPE_KINDS}")
        if self.rope_kind != "native" and (not self.hw_branch or self.head_dim % 16):
            raise ValueError(f"rope_kind={self.rope_kind!r} needs hw_branch=True and head_dim % 16 == 0 (its "
                             f"frequency sections), got hw_branch={self.hw_branch}, head_dim={self.head_dim}")

    @property
    def num_layers(self) -> int:
        return self.num_prebuffer_layers + self.num_llm_layers

    @property
    def qk_dim(self) -> int:
        return 2 * self.head_dim if self.hw_branch else self.head_dim

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)
