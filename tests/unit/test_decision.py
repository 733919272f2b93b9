"""Where a prompt is prefilled (decode.decision): every rule, its boundaries and its counts."""

from __future__ import annotations

from collections import Counter

import pytest

from decode.decision import Decision, DecisionPolicy, Reason, Where

MAX_LOCAL = 100  # max_local_prefill_tokens
MAX_QUEUE = 2  # max_prefill_queue
CAP = 10  # max_remote_reserved_blocks

LOCAL, REMOTE = Where.LOCAL, Where.REMOTE

# (mode, cap, uncached_tokens, num_blocks_to_send, prefill_queue, num_reserved_blocks,
#  where, reason)
CASES = [
    # never: local whatever the inputs.
    ("never", CAP, 500, 5, 0, 0, LOCAL, Reason.MODE_NEVER),
    ("never", CAP, 500, 0, None, 99, LOCAL, Reason.MODE_NEVER),
    # always: remote whenever there is something to send and a worker to take it.
    ("always", CAP, 1, 1, 50, 99, REMOTE, Reason.MODE_ALWAYS),
    ("always", None, 500, 5, 0, 0, REMOTE, Reason.MODE_ALWAYS),
    ("always", CAP, 500, 0, 0, 0, LOCAL, Reason.NOTHING_TO_SEND),
    ("always", CAP, 500, 5, None, 0, LOCAL, Reason.NO_PREFILL_WORKER),
    # conditional, in the order the rules apply.
    ("conditional", CAP, 500, 0, 0, 0, LOCAL, Reason.NOTHING_TO_SEND),
    ("conditional", CAP, 500, 0, None, 0, LOCAL, Reason.NOTHING_TO_SEND),
    ("conditional", CAP, 500, 5, None, 0, LOCAL, Reason.NO_PREFILL_WORKER),
    ("conditional", CAP, 1, 5, None, 0, LOCAL, Reason.NO_PREFILL_WORKER),
    ("conditional", CAP, 0, 1, 0, 0, LOCAL, Reason.SHORT_UNCACHED),
    ("conditional", CAP, MAX_LOCAL, 5, 0, 0, LOCAL, Reason.SHORT_UNCACHED),
    ("conditional", CAP, MAX_LOCAL, 5, MAX_QUEUE + 1, CAP, LOCAL, Reason.SHORT_UNCACHED),
    ("conditional", CAP, MAX_LOCAL + 1, 5, 0, 0, REMOTE, Reason.LONG_UNCACHED),
    ("conditional", CAP, MAX_LOCAL + 1, 5, MAX_QUEUE, 0, REMOTE, Reason.LONG_UNCACHED),
    ("conditional", CAP, MAX_LOCAL + 1, 5, MAX_QUEUE + 1, 0, LOCAL, Reason.PREFILL_QUEUE_FULL),
    ("conditional", CAP, MAX_LOCAL + 1, 5, MAX_QUEUE + 1, CAP, LOCAL,
     Reason.PREFILL_QUEUE_FULL),
    # The cap counts the blocks this request would add: reaching it exactly is allowed.
    ("conditional", CAP, MAX_LOCAL + 1, 5, 0, CAP - 5, REMOTE, Reason.LONG_UNCACHED),
    ("conditional", CAP, MAX_LOCAL + 1, 5, 0, CAP - 4, LOCAL, Reason.RESERVATION_CAP),
    ("conditional", CAP, MAX_LOCAL + 1, CAP, 0, 0, REMOTE, Reason.LONG_UNCACHED),
    ("conditional", CAP, MAX_LOCAL + 1, CAP + 1, 0, 0, LOCAL, Reason.RESERVATION_CAP),
    ("conditional", CAP, MAX_LOCAL + 1, 1, 0, CAP, LOCAL, Reason.RESERVATION_CAP),
    ("conditional", 0, MAX_LOCAL + 1, 1, 0, 0, LOCAL, Reason.RESERVATION_CAP),
    ("conditional", None, MAX_LOCAL + 1, 1000, 0, 10**6, REMOTE, Reason.LONG_UNCACHED),
]


def policy(mode: str = "conditional", cap: int | None = CAP) -> DecisionPolicy:
    return DecisionPolicy(mode, MAX_LOCAL, MAX_QUEUE, cap)


@pytest.mark.parametrize(
    "mode,cap,uncached_tokens,num_blocks_to_send,prefill_queue,num_reserved_blocks,where,reason",
    CASES)
def test_decide(mode: str, cap: int | None, uncached_tokens: int, num_blocks_to_send: int,
                prefill_queue: int | None, num_reserved_blocks: int, where: Where,
                reason: Reason):
    decision = policy(mode, cap).decide(uncached_tokens, num_blocks_to_send, prefill_queue,
                                        num_reserved_blocks)
    assert decision == Decision(where, reason)


def test_the_table_covers_every_reason():
    assert {case[-1] for case in CASES} == set(Reason)


def test_counts_every_decision_by_where_and_reason():
    conditional, always, never = policy(), policy("always"), policy("never")
    for mode, cap, *inputs, _, _ in CASES:
        if cap == CAP:
            {"conditional": conditional, "always": always, "never": never}[mode].decide(*inputs)
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


@pytest.mark.parametrize("mode", ["Conditional", "sometimes", ""])
def test_invalid_mode_names_disagg_mode(mode: str):
    with pytest.raises(ValueError) as invalid:
        DecisionPolicy(mode, MAX_LOCAL, MAX_QUEUE, CAP)
    assert str(invalid.value) == (
        f"disagg_mode={mode!r} is invalid: conditional, always or never")
