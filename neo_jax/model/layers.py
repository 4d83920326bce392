"""Small building blocks: partitioned Dense, RMSNorm, SwiGLU MLP.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); a rules table
(neo_jax/parallel/rules.py) maps them to mesh axes. Kernels are [in, out] (the transpose of PyTorch's
Linear weight), so conversion is a rename-and-transpose.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo_jax.model.config import ModelConfig

normal_init = nn.initializers.normal(stddev=0.02)  # NEO pre-buffer / Qwen3 init (NEO_PAPER.md §1.7)


def torch_default_init(fan_in: int):
    """PyTorch's default Linear/Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), used by the PEL."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
    """y = x @ kernel (+ bias), kernel [in, out] with logical axes."""

    features: int
    axes: tuple[str, str]
    cfg: ModelConfig
    use_bias: bool = False
    kernel_init: object = normal_init
    bias_init: object = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.cfg.weight_dtype)
        dtype = self.cfg.compute_dtype
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[1:]),
                              (self.features,), self.cfg.weight_dtype)
            y = y + bias.astype(dtype)
        return y


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in float32, cast back, multiply by the learned scale (init 1)."""

    cfg: ModelConfig
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.cfg.weight_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return scale.astype(self.cfg.compute_dtype) * xf.astype(self.cfg.compute_dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); no biases."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        gate = Dense(c.intermediate_size, ("embed", "mlp"), c, name="gate_proj")(x)
        up = Dense(c.intermediate_size, ("embed", "mlp"), c, name="up_proj")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Dense(c.hidden_size, ("mlp", "embed"), c, name="down_proj")(h)
