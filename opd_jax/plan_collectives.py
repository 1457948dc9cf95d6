"""Collectives of a compiled program, read from its optimised HLO text, with loops multiplied out.

The SPMD partitioner inserts the collectives (FSDP weight gathers, gradient reduce-scatters,
partial-sum all-reduces, ...) after the jaxpr, so :mod:`opd_jax.plan` counts them on
``compiled.as_text()``: every ``all-gather``, ``reduce-scatter``, ``all-reduce``, ``all-to-all``
and ``collective-permute`` (synchronous, or as an async ``-start`` / ``-done`` pair), in every
computation the entry reaches (fusions and called computations included; reduction bodies
excluded).

**Bytes per device.** What one device sends plus receives under the ring algorithms, for a
result of ``R`` bytes on a group of ``n`` devices:

- all-gather, all-to-all: ``2 (n − 1) / n · R``;
- reduce-scatter (result ``R``, operand ``n · R``): ``2 (n − 1) · R``;
- all-reduce (a reduce-scatter then an all-gather): ``4 (n − 1) / n · R``;
- collective-permute: ``2 R``.

Divided by the chip's bidirectional ICI bandwidth (:attr:`opd_jax.topologies.Chip.ici_bandwidth`)
this is a lower bound on the time: every link of the chip busy, no latency.

**Loops.** The HLO ``while`` loops are the jaxpr's scans and loops plus loops the compiler makes of
its own (large sharded matmuls). A loop whose condition is ``counter < constant`` with a counter
that starts at a constant runs ``constant − start`` times. The sampler's decode segments end when
every row has stopped too, so their trip counts are not in the HLO: those loops (the top-level
loops without a static count, in program order) take the trip counts the jaxpr gives
(:class:`opd_jax.plan._Counter`); ``matched`` says whether their number agreed.

**Weight gathers in a decode loop.** An all-gather in a loop body whose input does not depend on
anything the loop changes (only on loop-invariant elements of its carry: the weights) gathers the
same data at every step: a weight gather. Its absence means the compiler either hoisted the gather
out of the loop (holding a gathered copy) or computes on the shards (partial sums then
all-reduced activations).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

__all__ = ["COLLECTIVES", "CollectiveCount", "count_collectives", "shape_bytes"]

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLED = re.compile(r"\b(condition|body|calls|branch_computations|true_computation|false_computation)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (a tuple's elements summed; layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attributes: str
    root: bool
    arguments: str = ""  # the text between the opcode's parentheses (a constant's value)


def _split_operands(rest: str) -> tuple[str, str]:
    """``(operands, attributes)`` of the text after ``opcode(``."""
    depth = 1
    for i, char in enumerate(rest):
        depth += (char in "({[") - (char in ")}]")
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def _parse(hlo: str) -> tuple[dict[str, list[_Instruction]], str | None]:
    """Computations by name (instructions in order) and the entry computation's name."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if not line.strip() or line.startswith(("HloModule", "//")):
            continue
        if not line[0].isspace():
            if line.rstrip().endswith("{"):
                header = line.split()
                is_entry = header[0] == "ENTRY"
                current = header[1 if is_entry else 0].lstrip("%")
                computations[current] = []
                entry = current if is_entry else entry
            else:
                current = None
            continue
        match = _INSTRUCTION.match(line) if current is not None else None
        if match:
            operands, attributes = _split_operands(match.group(5))
            computations[current].append(_Instruction(
                match.group(2), match.group(3), match.group(4), re.findall(r"%([\w.\-]+)", operands), attributes,
                bool(match.group(1)), operands))
    return computations, entry


def _group_size(attributes: str, devices: int) -> int:
    """Devices in one replica group of a collective."""
    if match := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes):
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", match.group(1))}
        return math.prod(sizes.get(name, 1) for name in re.findall(r"'([^']+)'", match.group(2)))
    if match := re.search(r"replica_groups=\[([\d,]+)\]<=", attributes):  # iota: [groups, size]
        return int(match.group(1).split(",")[-1])
    if match := re.search(r"replica_groups=\{\{([\d,\s]*)\}", attributes):
        return len([d for d in match.group(1).split(",") if d.strip()])
    return devices  # replica_groups={} or none: all devices


def _moved_bytes(kind: str, result_bytes: float, group: int) -> float:
    if group <= 1 and kind != "collective-permute":
        return 0.0
    factor = {"all-gather": 2 * (group - 1) / group, "all-to-all": 2 * (group - 1) / group,
              "reduce-scatter": 2 * (group - 1), "all-reduce": 4 * (group - 1) / group, "collective-permute": 2}
    return factor[kind] * result_bytes


@dataclasses.dataclass
class CollectiveCount:
    """Per-device bytes moved by a program's collectives, by kind (see the module docstring).

    Attributes:
      outside: bytes outside the dynamic top-level loops (loops with a static count multiplied out).
      loops: per dynamic top-level loop, the bytes of one trip (condition included).
      loop_weight_gathers: per dynamic top-level loop, the bytes of one trip's all-gathers of
        loop-invariant data (weight gathers).
      matched: whether the dynamic top-level loops were as many as the trip counts given.
    """

    outside: dict[str, float]
    loops: list[dict[str, float]]
    loop_weight_gathers: list[float]
    matched: bool

    def total(self, trips: Sequence[int]) -> dict[str, float]:
        """Bytes by kind over the whole program, each loop × its trips."""
        total = dict(self.outside)
        for loop, count in zip(self.loops, trips):
            for kind, value in loop.items():
                total[kind] = total.get(kind, 0.0) + count * value
        return total


class _Walker:
    """Follows the call graph from the entry, multiplying the collectives inside loops."""

    def __init__(self, computations, devices: int, loop_trips: Sequence[int], loop_bounds: Sequence[int | None]):
        self.computations, self.devices = computations, devices
        self.loop_trips, self.loop_bounds = list(loop_trips), list(loop_bounds)
        self.outside: dict[str, float] = {}
        self.loops: list[dict[str, float]] = []
        self.weight_gathers: list[float] = []
        self.unmatched = 0

    def computation(self, name: str, scale: float, target: dict[str, float], top: bool,
                    invariant_in: bool = False, loop_index: int | None = None) -> None:
        instructions = self.computations.get(name, [])
        by_name = {i.name: i for i in instructions}
        invariant = _invariant(instructions) if loop_index is not None and not invariant_in else None
        for instruction in instructions:
            kind = _collective_kind(instruction.opcode)
            is_invariant = invariant_in or (invariant is not None and instruction.name in invariant)
            if kind is not None:
                result = _result_shape(instruction, instructions)
                moved = _moved_bytes(kind, shape_bytes(result), _group_size(instruction.attributes, self.devices))
                target[kind] = target.get(kind, 0.0) + scale * moved
                if loop_index is not None and kind == "all-gather" and is_invariant:
                    self.weight_gathers[loop_index] += scale * moved
            if instruction.opcode == "while":
                self.loop(instruction, by_name, scale, target, top, loop_index)
                continue
            for called in _called(instruction):
                self.computation(called, scale, target, top and instruction.opcode == "call", is_invariant,
                                 loop_index)

    def _is_next(self, condition: list[_Instruction]) -> bool:
        """Whether a loop is the next one the jaxpr gave: its condition compares with that loop's bound."""
        bound = self.loop_bounds[len(self.loops)] if len(self.loops) < len(self.loop_bounds) else None
        if bound is None:
            return True
        local = {i.name: i for i in condition}
        for instruction in condition:
            if instruction.opcode == "compare":
                for operand in instruction.operands:
                    constant = local.get(operand)
                    if (constant is not None and constant.opcode == "constant"
                            and constant.arguments.strip() == str(bound)):
                        return True
        return False

    def loop(self, instruction, by_name, scale, target, top, loop_index) -> None:
        called = dict(re.findall(r"\b(condition|body)=%?([\w.\-]+)", instruction.attributes))
        trips = _static_trips(self.computations.get(called.get("condition"), []), instruction, by_name,
                              self.computations.get(called.get("body"), []))
        index = len(self.loops)
        if (trips is None and top and loop_index is None and index < len(self.loop_trips)
                and self._is_next(self.computations.get(called.get("condition"), []))):
            self.loops.append({})
            self.weight_gathers.append(0.0)
            for part in ("condition", "body"):
                self.computation(called[part], 1.0, self.loops[index], False, loop_index=index)
            return
        if trips is None:
            self.unmatched += 1
            trips = 1
        for part, count in (("condition", trips + 1), ("body", trips)):
            self.computation(called[part], scale * count, target, False, loop_index=loop_index)


def count_collectives(hlo: str, devices: int, loop_trips: Sequence[int] = (),
                      loop_bounds: Sequence[int | None] = ()) -> CollectiveCount:
    """The collectives of an optimised HLO module (``compiled.as_text()``).

    Args:
      hlo: the module's text.
      devices: devices of the program (a collective without replica groups spans them all).
      loop_trips: trip counts of the top-level loops whose count is not static (the sampler's
        decode segments), in program order, from the jaxpr.
      loop_bounds: the bound each of those loops compares its counter with (``None``: unknown); a
        loop of the compiled program is taken for the next of them only if its condition compares
        with that constant, so that a loop of the compiler's own is not mistaken for one.

    Returns:
      A :class:`CollectiveCount`.
    """
    computations, entry = _parse(hlo)
    walker = _Walker(computations, devices, loop_trips, loop_bounds)
    if entry is not None:
        walker.computation(entry, 1.0, walker.outside, top=True)
    matched = walker.unmatched == 0 and len(walker.loops) == len(loop_trips)
    return CollectiveCount(walker.outside, walker.loops, walker.weight_gathers, matched)


def _invariant(instructions: list[_Instruction]) -> set[str]:
    """Names of the instructions of a loop body that depend only on carry elements the body returns
    unchanged (and on constants)."""
    params = {i.name for i in instructions if i.opcode == "parameter"}
    by_name = {i.name: i for i in instructions}
    root = next((i for i in instructions if i.root), None)
    kept = set()
    if root is not None and root.opcode == "tuple":
        for index, operand in enumerate(root.operands):
            source = by_name.get(operand)
            if (source is not None and source.opcode == "get-tuple-element" and source.operands[:1]
                    and source.operands[0] in params and _tuple_index(source) == index):
                kept.add(index)
    invariant = set()
    for instruction in instructions:
        if instruction.opcode == "parameter" or instruction.opcode.startswith("rng"):
            continue
        if instruction.opcode == "get-tuple-element" and instruction.operands[:1] and instruction.operands[0] in params:
            if _tuple_index(instruction) in kept:
                invariant.add(instruction.name)
        elif all(operand in invariant for operand in instruction.operands):
            invariant.add(instruction.name)
    return invariant


def _tuple_index(instruction: _Instruction) -> int | None:
    match = re.search(r"index=(\d+)", instruction.attributes)
    return int(match.group(1)) if match else None


def _collective_kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in COLLECTIVES and not opcode.endswith("-done") else None


def _result_shape(instruction: _Instruction, instructions: list[_Instruction]) -> str:
    """The result of a collective (for an async ``-start``, the shape of its ``-done``)."""
    if not instruction.opcode.endswith("-start"):
        return instruction.shape
    done = instruction.opcode.removesuffix("-start") + "-done"
    for other in instructions:
        if other.opcode == done and instruction.name in other.operands:
            return other.shape
    return instruction.shape


def _called(instruction: _Instruction) -> list[str]:
    names = []
    for _, value in _CALLED.findall(instruction.attributes):
        names += re.findall(r"%?([\w.\-]+)", value.strip("{}"))
    return names


def _static_trips(condition: list[_Instruction], instruction: _Instruction, by_name,
                  body: Sequence[_Instruction] = ()) -> int | None:
    """Trips of a loop whose condition is ``get-tuple-element(i) < constant`` and whose carry's
    element ``i`` starts at a constant (a scan, or a loop of the compiler's); else ``None``. The
    counter steps by the constant the body adds to it where that is visible, else by 1."""
    roots = [i for i in condition if i.root]
    if len(roots) != 1 or roots[0].opcode != "compare" or "direction=LT" not in roots[0].attributes:
        return None
    local = {i.name: i for i in condition}
    counter, bound = (local.get(name) for name in roots[0].operands[:2])
    if counter is None or bound is None or counter.opcode != "get-tuple-element" or bound.opcode != "constant":
        return None
    index = _tuple_index(counter)
    start = by_name.get(instruction.operands[0]) if instruction.operands else None
    for _ in range(4):  # through copies and bitcasts of the initial tuple element
        if start is None or start.opcode not in ("tuple", "copy", "bitcast"):
            break
        start = by_name.get(start.operands[index] if start.opcode == "tuple" else start.operands[0])
        if start is not None and start.opcode == "constant":
            try:
                return max(0, -(-(_constant(bound) - _constant(start)) // _counter_step(body, index)))
            except ValueError:
                return None
    return None


def _counter_step(body: Sequence[_Instruction], index: int) -> int:
    """What a loop body adds to carry element ``index``: ``add(get-tuple-element(index), constant)``
    at that place of its root tuple; 1 where it is not of that form (a fused increment)."""
    local = {i.name: i for i in body}
    root = next((i for i in body if i.root), None)
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return 1
    step = local.get(root.operands[index])
    if step is None or step.opcode != "add":
        return 1
    operands = [local.get(name) for name in step.operands]
    counters = [o for o in operands if o is not None and o.opcode == "get-tuple-element" and _tuple_index(o) == index]
    constants = [o for o in operands if o is not None and o.opcode == "constant"]
    if len(counters) == 1 and len(constants) == 1:
        try:
            return max(1, _constant(constants[0]))
        except ValueError:
            return 1
    return 1


def _constant(instruction: _Instruction) -> int:
    return int(instruction.arguments.strip())
