"""neo-jax: the NEO native vision-language model (arXiv 2510.14979) in JAX/Flax."""

__version__ = "0.1.0"
