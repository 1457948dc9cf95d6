"""Accelerator chips and named device topologies, for compiling a program without running it.

A topology name is one of:

- ``v4-N``, ``v5p-N``: Cloud TPU slices named by their TensorCore count (two per chip, used as one
  "megacore" device), so ``v5p-64`` is 32 chips (``v5p:2x4x4``);
- ``v5e-N`` (also ``v5litepod-N``), ``v6e-N``: slices named by their chip count (one TensorCore
  each), ``N`` in 1, 4, 8, 16, 32, 64, 128, 256;
- ``v5p:AxBxC``, ``v4:AxBxC``, ``v5e:AxB``, ``v6e:AxB``: an explicit chip grid in libtpu's form;
- ``cpu:N``: ``N`` virtual CPU devices (XLA's ``jax_num_cpu_devices``, which must be set before
  jax starts its CPU backend: ``JAX_NUM_CPU_DEVICES=N``, or call this before touching a device);
- ``local``: the devices of this process (``jax.devices()``).

TPU topologies come from libtpu (``jax.experimental.topologies.get_topology_desc``), which gives
compile-only devices on any host: ``pip install "opd-jax[tpu]"``. The slice shapes follow the
Cloud TPU tables (v5p: https://cloud.google.com/tpu/docs/v5p, v4: https://cloud.google.com/tpu/docs/v4,
v5e: https://cloud.google.com/tpu/docs/v5e, v6e: https://cloud.google.com/tpu/docs/v6e); every
name below was checked to be accepted by libtpu 0.0.50.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Sequence

import jax

__all__ = ["CHIPS", "Chip", "Topology", "device_memory_bytes", "parse_topology", "valid_forms"]

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one accelerator kind.

    Attributes:
      name: ``v4``, ``v5e``, ``v5p``, ``v6e``, ``h100``, ``h200`` or ``cpu``.
      peak_flops: dense bf16 FLOP/s of one chip (vendor peak).
      hbm_bytes: memory of one chip (documented capacity).
      hbm_bandwidth: memory bandwidth of one chip, bytes/s.
      compiler_hbm_bytes: the most a single program may use per chip according to the compiler
        (libtpu 0.0.50's ``CompileTimeHbmOom`` message: "exceeds available HBM (…G)"); ``None`` where
        not measured. The plan's ``device_memory_bytes`` is the smaller of this and ``hbm_bytes``.
      source: where the figures come from.
      ici_bandwidth: bidirectional chip-to-chip interconnect bandwidth of one chip (ICI on TPU,
        NVLink on GPU), bytes/s: what the plan divides a device's collective traffic (bytes sent
        plus received) by. A lower bound on collective time: it assumes every link of the chip busy.
    """

    name: str
    peak_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    compiler_hbm_bytes: int | None
    source: str
    ici_bandwidth: float

    @property
    def memory_bytes(self) -> int:
        """Per-chip memory a plan must fit in."""
        if self.compiler_hbm_bytes is None:
            return self.hbm_bytes
        return min(self.hbm_bytes, self.compiler_hbm_bytes)


CHIPS: dict[str, Chip] = {
    # "Peak compute per chip 275 teraflops (bf16 or int8); HBM2 capacity and bandwidth 32 GiB, 1200 GBps".
    # ICI: the v4 page gives no per-chip figure; 6 links per chip at 45 GB/s each way (the JAX
    # scaling book, "How to Think About TPUs", https://jax-ml.github.io/scaling-book/tpus/): 540 GB/s.
    "v4": Chip("v4", 275e12, 32 * GIB, 1200e9, int(30.75 * GIB), "https://cloud.google.com/tpu/docs/v4", 540e9),
    # "Peak compute per chip (bf16) 197 TFLOPs; HBM2 capacity and bandwidth 16 GB, 819 GBps";
    # "Bidirectional inter-chip interconnect (ICI) bandwidth (per chip) 400 GBps".
    "v5e": Chip("v5e", 197e12, 16 * GIB, 819e9, int(15.75 * GIB), "https://cloud.google.com/tpu/docs/v5e", 400e9),
    # "Peak compute per chip (BF16) 459 TFLOPs; HBM capacity per chip 95 GiB; HBM bandwidth 2765 GBps";
    # "Bidirectional inter-chip interconnect (ICI) bandwidth per chip (GBps) 1200".
    "v5p": Chip("v5p", 459e12, 95 * GIB, 2765e9, int(95.73 * GIB), "https://cloud.google.com/tpu/docs/v5p", 1200e9),
    # "Peak compute per chip (bf16) 918 TFLOPs; HBM capacity per chip 32 GB; HBM bandwidth 1638 GBps";
    # "Bidirectional inter-chip interconnect (ICI) bandwidth (per chip) 800 GBps".
    "v6e": Chip("v6e", 918e12, 32 * GIB, 1638e9, int(31.24 * GIB), "https://cloud.google.com/tpu/docs/v6e", 800e9),
    # NVIDIA datasheets (SXM, dense bf16 without sparsity): H100 80 GB HBM3 at 3.35 TB/s; H200 141 GB
    # HBM3e at 4.8 TB/s; both "NVLink: 900GB/s" (bidirectional). https://www.nvidia.com/en-us/data-center/h100/ , /h200/
    "h100": Chip("h100", 989e12, 80 * 10**9, 3.35e12, None, "https://www.nvidia.com/en-us/data-center/h100/", 900e9),
    "h200": Chip("h200", 989e12, 141 * 10**9, 4.8e12, None, "https://www.nvidia.com/en-us/data-center/h200/", 900e9),
    # Virtual CPU devices share the host: memory is filled in per topology (host RAM / devices);
    # the speed figures are nominal, for a roofline of the right order only (a collective between
    # them is a copy in host memory).
    "cpu": Chip("cpu", 1e11, 0, 2e10, None, "nominal: one host core group, ~100 GFLOP/s, ~20 GB/s", 2e10),
}

# Slice sizes Cloud TPU offers for the 2D (one TensorCore per chip) generations, in chips.
_SLICES_2D = (1, 4, 8, 16, 32, 64, 128, 256)
# 3D generations: powers of two from one host (4 chips) to the largest documented cube shapes.
_MAX_CHIPS_3D = {"v4": 4096, "v5p": 4096}
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                 "TPU v6 lite": "v6e", "TPU v6e": "v6e", "NVIDIA H100": "h100", "NVIDIA H200": "h200", "cpu": "cpu"}


def _shape_3d(chips: int) -> tuple[int, int, int]:
    """Cloud TPU's slice shape for a power-of-two chip count: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ..."""
    if chips == 4:
        return (2, 2, 1)
    k = chips.bit_length() - 1
    a, b = k // 3, (k + 1) // 3
    return (2**a, 2**b, 2 ** (k - a - b))


def _shape_2d(chips: int) -> tuple[int, int]:
    k = chips.bit_length() - 1
    return (2 ** (k // 2), 2 ** (k - k // 2))


def valid_forms() -> str:
    """The accepted topology names, for error messages."""
    sizes_3d = ", ".join(str(2 * 2**k) for k in range(2, 13))
    sizes_2d = ", ".join(str(n) for n in _SLICES_2D)
    return (f"v5p-N or v4-N (N TensorCores = 2 per chip: {sizes_3d}), "
            f"v5e-N or v6e-N (N chips: {sizes_2d}), an explicit chip grid such as v5p:2x4x4 or v6e:8x8, "
            "cpu:N (N virtual CPU devices) or local")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A set of devices to compile for.

    Attributes:
      name: the name it was parsed from.
      chip: its :class:`Chip`.
      num_devices: devices (= chips; a v4 / v5p megacore chip is one device).
      libtpu_name: the ``topology_name`` passed to libtpu (``None`` off TPU).
    """

    name: str
    chip: Chip
    num_devices: int
    libtpu_name: str | None = None

    @property
    def is_tpu(self) -> bool:
        return self.libtpu_name is not None

    def devices(self) -> list[jax.Device]:
        """The devices, compile-only for a TPU topology.

        Raises:
          ValueError: libtpu is missing (the message says how to install it), libtpu rejects the
            shape, or fewer CPU devices exist than ``cpu:N`` asks for.
        """
        if self.is_tpu:
            return _tpu_devices(self.libtpu_name, self.chip.name)
        if self.name == "local":
            return list(jax.devices())
        return _cpu_devices(self.num_devices)

    def memory_bytes(self, devices: Sequence[jax.Device] | None = None) -> int:
        """Per-device memory a plan must fit in (for local accelerators: what the runtime reports)."""
        if self.chip.name == "cpu":
            return _host_memory_bytes() // self.num_devices
        if self.name == "local" and devices:
            return device_memory_bytes(devices)
        return self.chip.memory_bytes


def device_memory_bytes(devices: Sequence[jax.Device]) -> int:
    """Memory of one of ``devices`` (all of one kind): what the runtime reports, else the chip's
    documented figure; CPU devices share the host's memory.

    Raises:
      ValueError: neither the runtime nor :data:`CHIPS` knows the device kind.
    """
    if devices[0].platform == "cpu":
        return _host_memory_bytes() // len(devices)
    stats = _memory_stats(devices[0])
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    kind = _chip_kind(devices[0])
    if kind is None:
        raise ValueError(f"no memory figure for device kind {devices[0].device_kind!r}; known: {', '.join(sorted(CHIPS))}")
    return CHIPS[kind].memory_bytes


def parse_topology(text: str) -> Topology:
    """A :class:`Topology` from its name (see the module docstring).

    Raises:
      ValueError: an unknown name or size; the message lists the valid forms.
    """
    name = text.strip().lower()
    if name == "local":
        devices = jax.devices()
        kind = _chip_kind(devices[0])
        if kind is None:
            raise ValueError(f"topology 'local': no chip figures for device kind {devices[0].device_kind!r}; "
                             f"known: {', '.join(sorted(CHIPS))}")
        return Topology("local", CHIPS[kind], len(devices))
    if match := re.fullmatch(r"cpu:(\d+)", name):
        count = int(match.group(1))
        if count < 1:
            raise ValueError(f"topology {text!r}: cpu:N needs N >= 1; valid forms: {valid_forms()}")
        return Topology(name, CHIPS["cpu"], count)
    if match := re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name):
        generation, count = match.group(1), int(match.group(2))
        generation = "v5e" if generation == "v5litepod" else generation
        if generation in _MAX_CHIPS_3D:
            chips = count // 2
            if count % 2 or chips < 4 or chips & (chips - 1) or chips > _MAX_CHIPS_3D[generation]:
                raise ValueError(f"topology {text!r}: {generation}-N counts TensorCores (2 per chip) and N/2 must "
                                 f"be a power of two from 4 to {_MAX_CHIPS_3D[generation]} chips; "
                                 f"valid forms: {valid_forms()}")
            shape: tuple[int, ...] = _shape_3d(chips)
        else:
            chips = count
            if chips not in _SLICES_2D:
                raise ValueError(f"topology {text!r}: {generation}-N counts chips, N in "
                                 f"{', '.join(map(str, _SLICES_2D))}; valid forms: {valid_forms()}")
            shape = _shape_2d(chips)
        return Topology(name, CHIPS[generation], chips, f"{generation}:{'x'.join(map(str, shape))}")
    if match := re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)", name):
        generation, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
        expected = 3 if generation in _MAX_CHIPS_3D else 2
        if len(dims) != expected or min(dims) < 1:
            raise ValueError(f"topology {text!r}: {generation} grids have {expected} dimensions "
                             f"(e.g. {'v5p:2x4x4' if expected == 3 else 'v6e:8x8'}); valid forms: {valid_forms()}")
        return Topology(name, CHIPS[generation], math.prod(dims), name)
    raise ValueError(f"unknown topology {text!r}; valid forms: {valid_forms()}")


def _chip_kind(device: jax.Device) -> str | None:
    if device.platform == "cpu":
        return "cpu"
    # Longest prefix first: "TPU v5 lite" before "TPU v5"; GPU kinds carry a memory suffix.
    for prefix in sorted(_DEVICE_KINDS, key=len, reverse=True):
        if device.device_kind.startswith(prefix):
            return _DEVICE_KINDS[prefix]
    return None


def _tpu_devices(libtpu_name: str, generation: str) -> list[jax.Device]:
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            f"topology {libtpu_name} needs libtpu, the TPU compiler, which compiles for TPUs on any host: "
            'pip install "opd-jax[tpu]"'
        )
    from jax.experimental import topologies

    if not any(os.path.exists(path) for path in ("/dev/accel0", "/dev/vfio")):
        # libtpu takes a host-wide lock (/tmp/libtpu_lockfile) meant for the chips of a TPU host; on a
        # host without chips it would only keep two planning processes from compiling side by side.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # A v4 chip's two TensorCores are one device in megacore mode (how v4 runs by default); libtpu's
    # topology description would otherwise list each core.
    options = {"chip_config_name": "megacore"} if generation == "v4" else {}
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name, **options).devices)
    except Exception as error:  # libtpu reports a bad shape as a runtime error
        if "lockfile" in str(error):
            raise ValueError(f"libtpu could not start for topology {libtpu_name}: another process holds its "
                             f"lock ({error}); on a TPU host set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile beside it"
                             ) from None
        raise ValueError(f"libtpu rejects topology {libtpu_name}: {error}; valid forms: {valid_forms()}") from None


def _cpu_devices(count: int) -> list[jax.Device]:
    try:
        # Takes effect only before the CPU backend starts; afterwards the check below decides.
        jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
    except RuntimeError:
        pass
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ValueError(
            f"topology cpu:{count} needs {count} CPU devices but jax started with {len(devices)}; set "
            f"JAX_NUM_CPU_DEVICES={count} in the environment before starting Python"
        )
    return list(devices[:count])


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_stats(device: jax.Device) -> dict | None:
    try:
        return device.memory_stats()
    except Exception:  # compile-only and some CPU devices report nothing
        return None
