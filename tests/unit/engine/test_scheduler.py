"""The scheduler's plans, read from plain records: budgets, admission order, retirement, starts."""

from dataclasses import dataclass

from llava_serve.engine.scheduler import Limits, StepPlan, schedule


@dataclass
class Req:
    seq_id: int
    prompt: int = 10
    computed: int = 0
    cached: int = 0
    tiles: int = 0
    rows: int = 1
    kv_budget: int = 100
    started: bool = False
    joined: bool = False
    is_choice: bool = False
    cancelled: bool = False
    finished: bool = False

    @property
    def prompt_left(self) -> int:
        return self.prompt - (self.computed if self.started else self.cached)


LIMITS = Limits(max_batch_size=4, max_batch_tokens=None, max_step_tokens=16, max_step_vision_tiles=5)


def test_decode_rows_take_one_token_each_and_prompts_share_the_rest_oldest_first():
    running = [Req(0, joined=True), Req(1, joined=True), Req(2, prompt=9, started=True), Req(3, prompt=20)]
    plan = schedule([], running, LIMITS)
    assert plan.tokens == {0: 1, 1: 1, 2: 9, 3: 5}
    assert plan.start == (3,) and plan.retire == () and plan.computes


def test_a_cached_prefix_leaves_less_to_compute():
    plan = schedule([Req(0, prompt=30, cached=24)], [], LIMITS)
    assert plan.admit == (0,) and plan.start == (0,) and plan.tokens == {0: 6}


def test_finished_and_cancelled_requests_retire_and_free_their_rows_for_admission():
    running = [
        Req(0, joined=True, finished=True),
        Req(1, joined=True),
        Req(2, cancelled=True),
        Req(3, joined=True),
    ]
    waiting = [Req(4), Req(5, cancelled=True), Req(6), Req(7)]
    plan = schedule(waiting, running, LIMITS)
    assert plan.retire == (0, 2)
    assert plan.admit == (4, 6) and plan.drop == (5,)  # two rows were free; 7 waits
    assert plan.tokens == {1: 1, 3: 1, 4: 10, 6: 4}


def test_nothing_overtakes_the_oldest_waiting_request():
    waiting = [Req(0, rows=3), Req(1)]  # three choices do not fit beside two running rows
    plan = schedule(waiting, [Req(8, joined=True), Req(9, joined=True)], LIMITS)
    assert plan.admit == ()
    capped = Limits(4, max_batch_tokens=250, max_step_tokens=16, max_step_vision_tiles=5)
    plan = schedule([Req(0, kv_budget=200), Req(1)], [Req(8, joined=True)], capped)
    assert plan.admit == ()  # 100 running + 200 would pass the cap of 250


def test_the_vision_budget_delays_starts_but_one_always_starts():
    waiting = [Req(0, tiles=4), Req(1, tiles=4), Req(2, tiles=1)]
    plan = schedule(waiting, [], LIMITS)
    assert plan.admit == (0, 1, 2) and plan.start == (0,)
    assert set(plan.tokens) == {0}  # the others start at a later step, in order
    plan = schedule([Req(0, tiles=50)], [], LIMITS)
    assert plan.start == (0,)


def test_choices_compute_nothing_of_their_own_and_an_empty_plan_computes_nothing():
    running = [Req(0, prompt=12, started=True, computed=4), Req(1, is_choice=True), Req(2, is_choice=True)]
    assert schedule([], running, LIMITS).tokens == {0: 8}
    assert schedule([], [], LIMITS) == StepPlan() and not StepPlan().computes
