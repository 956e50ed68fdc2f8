"""Adapter segments laid out for batched products, shared by the methods that apply per-segment weights.

Decode batches hold many short segments (a row or a few per adapter): applying them one by one costs a handful
of small products per segment at every site. Grouped, they take two batched products per site: the rows of G
segments as [G, M, d] (each padded to the longest, M rows), against the G adapters' weights gathered once as
[G, d, r] and [G, r, out]. Long segments (prefill) stay in a loop, one pair of matrix products each.

GroupPlanner plans the layout per step; RankedStacks holds a site's per-slot weights and reads them for a
layout (the grouped torch backend, server/kernels/torch_grouped.py, applies them); GroupedMethod is the part of
LoRA and the bottleneck adapters that only routes slots to their sites and picks the kernel backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from server.deltas.base import DeltaLimits, DeltaMethod, adapter_segments
from server.kernels.interface import KernelBackend, SegmentPlanner
from server.kernels.registry import select_backend
from server.model.batch import BatchDescriptor
from server.model.llama import CausalLM

# Segments of at most this many rows are grouped; longer ones are applied one by one.
GROUP_MAX_ROWS = 16
# Padding may at most double the grouped rows; the longest segments leave the group until it holds.
GROUP_MAX_PADDING = 2
# Batched products over one row per group run ~20% faster per byte than over two (measured on CPU): when at most
# this share of the grouped segments has several rows, those are looped and the single rows grouped alone.
MULTI_ROW_SHARE = 0.25
# A site reads its groups' weights straight from its stacks (a view over the slot range they span, no copy)
# when their slots fill at least this share of that range; the other slots' products are computed and dropped.
# Otherwise it copies the groups' weights out of the stacks, once per plan.
RANGE_MIN_FILL = 0.75

Segment = tuple[int, int, int]  # (first row, end row, slot)


@dataclass
class SegmentGroups:
    """One method's segments for a step; rebuilt only when the batch layout or the placements change."""

    groups: list[Segment]   # [G] segments applied together, each padded to `rows` rows
    loop: list[Segment]     # segments applied one by one
    plan_id: int            # names this layout and placement: sites regather their weights when it changes
    rows: int = 0           # M: padded rows per group
    group_slots: torch.Tensor | None = None  # [G] slot of each group
    span: tuple[int, int] = (0, 0)  # groups back to back, M rows each, in rows span[0]:span[1] (no padding)
    pad_index: torch.Tensor | None = None   # [G * M] row read by each padded position (otherwise)
    valid: torch.Tensor | None = None       # [n] padded positions that are real rows
    targets: torch.Tensor | None = None     # [n] their rows
    # (lo, hi): group g holds slot lo + g (groups of slots without rows here are empty): weights are stack views
    slot_range: tuple[int, int] | None = None
    # Same layout and placements as the previous step: every site's gathered weights are still right.
    reuse_gathered: bool = False

    @property
    def segments(self) -> list[Segment]:
        """Every segment of the step, grouped or looped."""
        return self.groups + self.loop

    @property
    def unpadded(self) -> bool:
        return self.pad_index is None

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] -> [G, M, d], the grouped segments' rows padded (a view when there is no padding)."""
        if self.pad_index is None:
            return x[self.span[0]:self.span[1]].reshape(len(self.groups), self.rows, x.shape[1])
        return x.index_select(0, self.pad_index).view(len(self.groups), self.rows, x.shape[1])

    def slot_rows(self, stack: torch.Tensor) -> torch.Tensor:
        """stack [S, ...] -> [G, ...], each group's slot: a view over slot_range, else a copy."""
        if self.slot_range is not None:
            return stack[self.slot_range[0]:self.slot_range[1] + 1]
        return stack[self.group_slots]

    def spanned(self, out: torch.Tensor) -> torch.Tensor:
        """out [N, d] -> its grouped rows as a [G, M, d] view (only when unpadded)."""
        return out[self.span[0]:self.span[1]].view(len(self.groups), self.rows, out.shape[1])

    def add_to(self, out: torch.Tensor, delta: torch.Tensor) -> None:
        """out [N, d] += delta [G, M, d] at the grouped rows; padding is dropped."""
        if self.pad_index is None:
            self.spanned(out).add_(delta)
        else:
            out.index_add_(0, self.targets, delta.view(-1, delta.shape[2]).index_select(0, self.valid))


def split_segments(segments: list[Segment]) -> tuple[list[Segment], list[Segment]]:
    """(groups, loop): short segments go together while padding them to the longest stays cheap."""
    short = sorted((s for s in segments if s[1] - s[0] <= GROUP_MAX_ROWS), key=lambda s: s[1] - s[0])
    rows = sum(end - start for start, end, _ in short)
    while len(short) > 1 and len(short) * (short[-1][1] - short[-1][0]) > GROUP_MAX_PADDING * rows:
        start, end, _ = short.pop()
        rows -= end - start
    singles = [s for s in short if s[1] - s[0] == 1]
    if len(singles) < len(short) <= len(singles) * (1 + MULTI_ROW_SHARE):
        short = singles   # a few multi-row segments would make every single row a padded pair: loop them
    if len(short) < 2:
        return [], segments
    grouped = set(short)
    return sorted(short), [s for s in segments if s not in grouped]


class GroupPlanner:
    """Plans one method's segment groups per step, reusing the last plan while nothing it depends on changed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._last: tuple[tuple, SegmentGroups] | None = None
        self._plans = 0
        self._subsets: dict[tuple[int, tuple[int, ...]], SegmentGroups] = {}

    def plan(self, batch: BatchDescriptor, segments: list[Segment], version: int) -> SegmentGroups:
        """`segments`: the batch's segments this method applies; `version`: bumped by every place/clear."""
        seg = batch.segments
        key = (tuple(seg.bounds), tuple(seg.slots), version)
        if self._last is not None and self._last[0] == key:
            return dataclasses.replace(self._last[1], reuse_gathered=True)
        step = self._build(segments)
        self._last = (key, step)
        return step

    def plan_rows(self, row_slots: torch.Tensor) -> SegmentGroups:
        raise NotImplementedError("the grouped torch kernels plan on the host: no captured decode steps")

    def subset(self, step: SegmentGroups, members: tuple[int, ...]) -> SegmentGroups:
        """The plan for a site where only the adapters of the groups at `members` (indices into step.groups)
        act: the others would only multiply zeros. When their slots are dense, the groups are laid out over
        the slot range they span (`slot_range`), so the site reads its stacks in place. Built once per plan and
        member set, so the sites of every layer share it."""
        key = (step.plan_id, members)
        found = self._subsets.get(key)
        if found is None:
            if len(self._subsets) > 64:
                self._subsets.clear()
            found = self._subsets[key] = self._site_layout(step, [step.groups[g] for g in members])
        return found

    def _site_layout(self, step: SegmentGroups, groups: list[Segment]) -> SegmentGroups:
        slots = [slot for _, _, slot in groups]
        lo, hi = min(slots), max(slots)
        if len(set(slots)) == len(slots) and len(slots) >= RANGE_MIN_FILL * (hi - lo + 1):
            by_slot = {slot: (start, end, slot) for start, end, slot in groups}
            laid = self._layout([by_slot.get(slot, (0, 0, slot)) for slot in range(lo, hi + 1)], [], step.plan_id)
            laid.slot_range = (lo, hi)
            return laid
        if len(groups) == len(step.groups):
            return step
        return self._layout(groups, [], step.plan_id)

    def _build(self, segments: list[Segment]) -> SegmentGroups:
        self._plans += 1
        groups, loop = split_segments(segments)
        return self._layout(groups, loop, self._plans)

    def _layout(self, groups: list[Segment], loop: list[Segment], plan_id: int) -> SegmentGroups:
        step = SegmentGroups(groups=groups, loop=loop, plan_id=plan_id)
        if not groups:
            return step

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        m = step.rows = max(end - start for start, end, _ in groups)
        step.group_slots = tensor([slot for _, _, slot in groups])
        first = groups[0][0]
        if all(start == first + i * m and end - start == m for i, (start, end, _) in enumerate(groups)):
            step.span = (first, first + m * len(groups))
            return step
        # an empty group (a slot without rows here) reads row 0; its products are dropped
        step.pad_index = tensor([start + max(0, min(j, end - start - 1)) for start, end, _ in groups for j in range(m)])
        step.valid = tensor([g * m + j for g, (start, end, _) in enumerate(groups) for j in range(end - start)])
        step.targets = tensor([row for start, end, _ in groups for row in range(start, end)])
        return step


class RankedStacks:
    """One site's per-slot weight stacks [slots, R, ...] (rows = rank), with each slot's rank. A placement writes
    only its rank's rows (on CPU only written memory becomes resident); products over a group read every group's
    rows up to the largest rank, so those beyond a slot's own are zeroed where they are read."""

    def __init__(self, *stacks: torch.Tensor) -> None:
        self.stacks = stacks
        self.ranks = [0] * stacks[0].shape[0]    # 0: nothing of the slot's adapter here
        self.zeroed = [0] * stacks[0].shape[0]   # rows known to hold the slot's weights or zeros
        self.version = 0                          # bumped by every placement and erasure
        # [slots] int32 on the stacks' device, written at each placement (never reallocated: a captured decode
        # step reads it where it was at capture)
        self.device_ranks = torch.zeros(len(self.ranks), dtype=torch.int32, device=stacks[0].device)
        # The largest rank ever placed here, rounded up to a power of two (at least 16): kernels size their grids
        # by it, so it changes (and a captured step is captured again) only when a rank outgrows it.
        self.bound = 0

    def placed(self, slot: int, rank: int) -> None:
        self.ranks[slot] = self.zeroed[slot] = rank
        self.device_ranks[slot] = rank
        self.bound = max(self.bound, 16, 1 << max(0, rank - 1).bit_length())
        self.version += 1

    def erase(self, slot: int) -> None:
        self.ranks[slot] = 0
        self.device_ranks[slot] = 0
        self.version += 1

    def gather(self, step: SegmentGroups, planner: GroupPlanner) -> tuple[SegmentGroups, list[torch.Tensor]] | None:
        """The step's groups with something here, and each stack's rows for them ([G, r, ...], r the largest
        rank); None when no group has anything here."""
        members = tuple(g for g, (_, _, slot) in enumerate(step.groups) if self.ranks[slot])
        if not members:
            return None
        groups = planner.subset(step, members)
        rank = max(self.ranks[step.groups[g][2]] for g in members)
        if groups.slot_range is not None:   # views, no copy: zero the rows they read once, in the stacks
            for start, end, slot in groups.groups:
                if end > start and self.zeroed[slot] < rank:
                    for stack in self.stacks:
                        stack[slot, self.zeroed[slot]:rank].zero_()
                    self.zeroed[slot] = rank
            return groups, [groups.slot_rows(stack)[:, :rank] for stack in self.stacks]
        copies = [stack[groups.group_slots, :rank] for stack in self.stacks]
        for g, (_, _, slot) in enumerate(groups.groups):
            if self.ranks[slot] < rank:   # zero the copies' rows the stacks never wrote
                for rows in copies:
                    rows[g, self.ranks[slot]:] = 0
        return groups, copies


class GroupedMethod(DeltaMethod):
    """A method whose sites hold per-slot weights and apply the step's segments through the kernel backend
    chosen for the model's device (LoRA, bottleneck adapters). Sites implement `erase(slot)`; subclasses fill
    `sites` and `slot_has` and bump `version` when they place."""

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        super().__init__(model, limits)
        self.sites: dict = {}
        self.slot_has = [False] * limits.num_slots
        self.version = 0          # bumped by every place/clear: invalidates plans and gathered weights
        device = model.lm_head.weight.device
        self.backend: KernelBackend = select_backend(device)
        self.planner: SegmentPlanner = self.backend.planner(device)

    def clear(self, slot: int) -> None:
        for site in self.sites.values():
            site.erase(slot)
        self.slot_has[slot] = False
        self.version += 1

    def launch_key(self) -> tuple:
        return tuple(sorted((str(key), site.stacks.bound) for key, site in self.sites.items()))

    def prepare(self, batch: BatchDescriptor) -> None:
        if batch.row_slots is not None:
            if self.sites:
                batch.method_state[self.name] = self.planner.plan_rows(batch.row_slots)
            return
        segments = [s for s in adapter_segments(batch, self.slot_has) if s[1] > s[0]]
        if segments:
            batch.method_state[self.name] = self.planner.plan(batch, segments, self.version)
