"""What each step computes: a pure function of the requests' state, returning a `StepPlan`.

There are no prefill and decode phases. A request has computed some of its tokens and wants
more: one, once its prompt is whole (a decode row), or as many of its prompt's positions as the
step's token budget leaves (a chunk). The plan also says which requests retire (their slots go back
at the start of the step; finished or cancelled, whoever noticed), which waiting ones are admitted,
and which start (their images go through the vision tower and their prompts are embedded), under
the vision budget. Nothing here touches a tensor or changes a request: the engine carries the plan
out, and the unit tests read plans from plain records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


class Request(Protocol):
    """What the scheduler reads of a request (`engine.sequence.Sequence` has all of it)."""

    seq_id: int
    cancelled: bool
    finished: bool
    joined: bool  # its prompt is whole: it decodes

    @property
    def started(self) -> bool: ...  # holds a slot and its prompt's embeddings

    @property
    def is_choice(self) -> bool: ...  # another of a request's n answers: joins with the first's prompt

    @property
    def rows(self) -> int: ...  # rows it takes once admitted (its n choices)

    @property
    def kv_budget(self) -> int: ...  # positions each of its rows may hold at its longest

    @property
    def prompt_left(self) -> int: ...  # prompt positions still to compute (after a cached prefix)

    @property
    def tiles(self) -> int: ...  # images' tiles (or video frames) the vision tower encodes to start it


@dataclass(frozen=True)
class Limits:
    max_batch_size: int  # rows running at once
    max_batch_tokens: int | None  # running rows' kv_budget together, when set
    max_step_tokens: int  # positions computed in one step
    max_step_vision_tiles: int  # tiles encoded in one step (one request always starts)


@dataclass(frozen=True)
class StepPlan:
    retire: tuple[int, ...] = ()  # running requests that leave: finished or cancelled
    drop: tuple[int, ...] = ()  # waiting requests that were cancelled
    admit: tuple[int, ...] = ()  # waiting requests that join the running ones, oldest first
    start: tuple[int, ...] = ()  # requests whose images are encoded and prompts embedded now
    tokens: Mapping[int, int] = field(default_factory=dict)  # positions each computes this step

    @property
    def computes(self) -> bool:
        return bool(self.tokens)


def schedule(waiting: Iterable[Request], running: Iterable[Request], limits: Limits) -> StepPlan:
    """The next step for `running` (admitted, in admission order) and `waiting` (FIFO)."""
    running = list(running)
    retire = tuple(r.seq_id for r in running if r.finished or r.cancelled)
    live = [r for r in running if not (r.finished or r.cancelled)]
    rows = len(live)
    cap = limits.max_batch_tokens
    room = float("inf") if cap is None else cap - sum(r.kv_budget for r in live)
    admitted: list[Request] = []
    drop: list[int] = []
    for r in waiting:
        if r.cancelled:
            drop.append(r.seq_id)
            continue
        if rows + r.rows > limits.max_batch_size or r.kv_budget * r.rows > room:
            break  # first come, first served: nothing overtakes the oldest waiting request
        admitted.append(r)
        rows += r.rows
        room -= r.kv_budget * r.rows
    tokens = {r.seq_id: 1 for r in live if r.joined}
    budget = limits.max_step_tokens - len(tokens)
    tiles = limits.max_step_vision_tiles
    start: list[int] = []
    for r in [*live, *admitted]:
        if r.joined or r.is_choice:
            continue
        if budget <= 0:
            break
        if not r.started:
            if r.tiles > tiles and start:
                break  # the tower's share of this step is spent; it starts at a later one
            tiles -= r.tiles
            start.append(r.seq_id)
        tokens[r.seq_id] = min(r.prompt_left, budget)
        budget -= tokens[r.seq_id]
    return StepPlan(retire, tuple(drop), tuple(r.seq_id for r in admitted), tuple(start), tokens)
