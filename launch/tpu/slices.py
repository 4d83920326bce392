"""Cloud TPU slice names -> chips, hosts and the TPU VM runtime (software) version.

    s = parse("v5p-128")    # Slice(name='v5p-128', generation='v5p', chips=64, hosts=16, ...)

Naming (Cloud TPU docs, "TPU versions"): v4 and v5p count TensorCores in the name (2 per chip), v5e
(`v5litepod-N`) and v6e count chips. Multi-host slices have 4 chips per VM; v5e/v6e single-host slices
(1, 4 or 8 chips) run on one VM. Runtime versions are the ones the docs give for JAX:
v4 `tpu-ubuntu2204-base`, v5e `v2-alpha-tpuv5-lite`, v5p `v2-alpha-tpuv5`, v6e `v2-alpha-tpuv6e`.
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str  # accelerator-type prefix, e.g. "v5litepod"
    cores_per_chip: int  # the number in the name counts chips * this
    runtime: str
    single_host: tuple[int, ...]  # chip counts served by one VM
    max_chips: int
    hbm_gib: int  # per chip


GENERATIONS = {
    "v4": Generation("v4", 2, "tpu-ubuntu2204-base", (4,), 4096, 32),
    "v5e": Generation("v5litepod", 1, "v2-alpha-tpuv5-lite", (1, 4, 8), 256, 16),
    "v5p": Generation("v5p", 2, "v2-alpha-tpuv5", (4,), 8960, 95),
    "v6e": Generation("v6e", 1, "v2-alpha-tpuv6e", (1, 4, 8), 256, 32),
}
CHIPS_PER_HOST = 4  # every multi-host slice of these generations


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # the --accelerator-type value
    generation: str
    chips: int
    hosts: int
    runtime_version: str
    hbm_gib_per_chip: int

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    def describe(self) -> str:
        return (f"{self.name}: {self.generation}, {self.chips} chips = {self.hosts} host(s) x "
                f"{self.chips_per_host} chips, {self.hbm_gib_per_chip} GiB HBM per chip, "
                f"runtime {self.runtime_version}")


def parse(accelerator: str) -> Slice:
    """`v4-32` | `v5litepod-256` (or `v5e-256`) | `v5p-128` | `v6e-64` -> Slice; errors name valid sizes."""
    m = re.fullmatch(r"(v4|v5litepod|v5e|v5p|v6e)-(\d+)", accelerator.strip().lower())
    if not m:
        raise ValueError(f"accelerator type {accelerator!r} not understood; use e.g. v4-32, v5litepod-256, "
                         f"v5p-128 or v6e-256")
    prefix, number = m.group(1), int(m.group(2))
    key = {"v5litepod": "v5e"}.get(prefix, prefix)
    gen = GENERATIONS[key]
    if number % gen.cores_per_chip:
        raise ValueError(f"{accelerator}: {key} names count TensorCores ({gen.cores_per_chip} per chip), so the "
                         f"number must be even")
    chips = number // gen.cores_per_chip
    if chips in gen.single_host:
        hosts = 1
    elif chips % CHIPS_PER_HOST or chips < CHIPS_PER_HOST or chips > gen.max_chips:
        smallest = gen.single_host[0] * gen.cores_per_chip
        raise ValueError(f"{accelerator}: {chips} chips is not a {key} slice size (multi-host slices are "
                         f"multiples of {CHIPS_PER_HOST} chips up to {gen.max_chips}; smallest "
                         f"{gen.prefix}-{smallest})")
    else:
        hosts = chips // CHIPS_PER_HOST
    return Slice(f"{gen.prefix}-{number}", key, chips, hosts, gen.runtime, gen.hbm_gib)
