"""Where a prompt is prefilled (decode.decision): every rule, its boundaries and its counts."""

from __future__ import annotations

from collections import Counter

import pytest

from decode.decision import Decision, DecisionPolicy, Reason, Where
from pdserve.choices import DisaggMode
from pdserve.config import DecodeConfig

MAX_LOCAL = 100  # max_local_prefill_tokens
MAX_QUEUE = 2  # max_prefill_queue
CAP = 10  # max_remote_reserved_blocks

LOCAL, REMOTE = Where.LOCAL, Where.REMOTE
CONDITIONAL, ALWAYS, NEVER = DisaggMode.CONDITIONAL, DisaggMode.ALWAYS, DisaggMode.NEVER

# (mode, cap, uncached_tokens, num_blocks_to_send, prefill_queue, num_reserved_blocks,
#  where, reason)
CASES = [
    # never: local whatever the inputs.
    (NEVER, CAP, 500, 5, 0, 0, LOCAL, Reason.MODE_NEVER),
    (NEVER, CAP, 500, 0, None, 99, LOCAL, Reason.MODE_NEVER),
    # always: remote whenever there is something to send and a worker to take it.
    (ALWAYS, CAP, 1, 1, 50, 99, REMOTE, Reason.MODE_ALWAYS),
    (ALWAYS, None, 500, 5, 0, 0, REMOTE, Reason.MODE_ALWAYS),
    (ALWAYS, CAP, 500, 0, 0, 0, LOCAL, Reason.NOTHING_TO_SEND),
    (ALWAYS, CAP, 500, 5, None, 0, LOCAL, Reason.NO_PREFILL_WORKER),
    # conditional, in the order the rules apply.
    (CONDITIONAL, CAP, 500, 0, 0, 0, LOCAL, Reason.NOTHING_TO_SEND),
    (CONDITIONAL, CAP, 500, 0, None, 0, LOCAL, Reason.NOTHING_TO_SEND),
    (CONDITIONAL, CAP, 500, 5, None, 0, LOCAL, Reason.NO_PREFILL_WORKER),
    (CONDITIONAL, CAP, 1, 5, None, 0, LOCAL, Reason.NO_PREFILL_WORKER),
    (CONDITIONAL, CAP, 0, 1, 0, 0, LOCAL, Reason.SHORT_UNCACHED),
    (CONDITIONAL, CAP, MAX_LOCAL, 5, 0, 0, LOCAL, Reason.SHORT_UNCACHED),
    (CONDITIONAL, CAP, MAX_LOCAL, 5, MAX_QUEUE + 1, CAP, LOCAL, Reason.SHORT_UNCACHED),
    (CONDITIONAL, CAP, MAX_LOCAL + 1, 5, 0, 0, REMOTE, Reason.LONG_UNCACHED),
    (CONDITIONAL, CAP, MAX_LOCAL + 1, 5, MAX_QUEUE, 0, REMOTE, Reason.LONG_UNCACHED),
    (CONDITIONAL, CAP, MAX_LOCAL + 1, 5, MAX_QUEUE + 1, 0, LOCAL, Reason.PREFILL_QUEUE_FULL),
    (CONDITIONAL, CAP, MAX_LOCAL + 1, 5, MAX_QUEUE + 1, CAP, LOCAL,
     Reason.PREFILL_QUEUE_FULL),
    # The cap counts the blocks this request would add: reaching it exactly is allowed.
    (CONDITIONAL, CAP, MAX_LOCAL + 1, 5, 0, CAP - 5, REMOTE, Reason.LONG_UNCACHED),
    (CONDITIONAL, CAP, MAX_LOCAL + 1, 5, 0, CAP - 4, LOCAL, Reason.RESERVATION_CAP),
    (CONDITIONAL, CAP, MAX_LOCAL + 1, CAP, 0, 0, REMOTE, Reason.LONG_UNCACHED),
    (CONDITIONAL, CAP, MAX_LOCAL + 1, CAP + 1, 0, 0, LOCAL, Reason.RESERVATION_CAP),
    (CONDITIONAL, CAP, MAX_LOCAL + 1, 1, 0, CAP, LOCAL, Reason.RESERVATION_CAP),
    (CONDITIONAL, 0, MAX_LOCAL + 1, 1, 0, 0, LOCAL, Reason.RESERVATION_CAP),
    (CONDITIONAL, None, MAX_LOCAL + 1, 1000, 0, 10**6, REMOTE, Reason.LONG_UNCACHED),
]


def policy(mode: DisaggMode = CONDITIONAL, cap: int | None = CAP) -> DecisionPolicy:
    return DecisionPolicy(mode, MAX_LOCAL, MAX_QUEUE, cap)


@pytest.mark.parametrize(
    "mode,cap,uncached_tokens,num_blocks_to_send,prefill_queue,num_reserved_blocks,where,reason",
    CASES)
def test_decide(mode: DisaggMode, cap: int | None, uncached_tokens: int, num_blocks_to_send: int,
                prefill_queue: int | None, num_reserved_blocks: int, where: Where,
                reason: Reason):
    decision = policy(mode, cap).decide(uncached_tokens, num_blocks_to_send, prefill_queue,
                                        num_reserved_blocks)
    assert decision == Decision(where, reason)


def test_the_table_covers_every_reason():
    assert {case[-1] for case in CASES} == set(Reason)


def test_counts_every_decision_by_where_and_reason():
    conditional, always, never = policy(), policy(ALWAYS), policy(NEVER)
    for mode, cap, *inputs, _, _ in CASES:
        if cap == CAP:
            {CONDITIONAL: conditional, ALWAYS: always, NEVER: never}[mode].decide(*inputs)
    assert conditional.counts == Counter({
        ("local", "nothing_to_send"): 2, ("local", "no_prefill_worker"): 2,
        ("local", "short_uncached"): 3, ("remote", "long_uncached"): 4,
        ("local", "prefill_queue_full"): 2, ("local", "reservation_cap"): 3,
    })
    assert always.counts == Counter({("remote", "mode_always"): 1,
                                     ("local", "nothing_to_send"): 1,
                                     ("local", "no_prefill_worker"): 1})
    assert never.counts == Counter({("local", "mode_never"): 2})


def test_counts_start_empty_and_repeat_decisions_add_up():
    counted = policy()
    assert counted.counts == Counter()
    for _ in range(3):
        counted.decide(MAX_LOCAL + 1, 1, 0, 0)
    counted.decide(MAX_LOCAL, 1, 0, 0)
    assert counted.counts == Counter({("remote", "long_uncached"): 3,
                                      ("local", "short_uncached"): 1})


@pytest.mark.parametrize("mode", ["conditional", "sometimes", None])
def test_a_mode_that_is_not_a_disagg_mode_is_refused(mode: object):
    # A string would compare unequal to every member and decide as `conditional`.
    with pytest.raises(ValueError) as invalid:
        DecisionPolicy(mode, MAX_LOCAL, MAX_QUEUE, CAP)
    assert str(invalid.value) == (f"disagg_mode: {mode!r} is invalid, must be a DisaggMode "
                                  f"(DecodeConfig turns the config's string into one)")


def test_the_config_hands_the_policy_a_mode():
    mode = DecodeConfig(disagg_mode="never").disagg_mode
    assert mode is NEVER
    assert policy(mode).decide(500, 5, 0, 0) == Decision(LOCAL, Reason.MODE_NEVER)
