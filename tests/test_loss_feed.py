"""LossFeed on its own: block lag, accumulation, GradScaler-skipped and loss-less steps, state."""

import math

import pytest
import torch

from surgeon.loss_feed import LossFeed, StepLoss


def run(feed: LossFeed, losses: list[float], scales: list[float] | None = None) -> list[StepLoss]:
    """Close one step per loss (``nan`` means: no loss added that step); collect what is due."""
    out: list[StepLoss] = []
    for i, loss in enumerate(losses):
        if not math.isnan(loss):
            feed.add(torch.tensor(loss))
        scale = None if scales is None else torch.tensor([scales[i]])
        out += feed.close_step(scale)
    return out


def test_blocks_come_back_one_block_late_in_order() -> None:
    feed = LossFeed(readback_every=3)
    for step in range(3):
        feed.add(torch.tensor(float(step)))
        assert feed.close_step() == []  # first block: in flight, not yet read
    for step in range(3, 5):
        feed.add(torch.tensor(float(step)))
        assert feed.close_step() == []
    feed.add(torch.tensor(5.0))
    assert [s.loss for s in feed.close_step()] == [0.0, 1.0, 2.0]


def test_micro_batches_of_a_full_window_are_summed() -> None:
    """Lightning divided each micro-batch loss by ``accumulate_grad_batches`` already: the sum
    of a full window is its mean."""
    feed = LossFeed(readback_every=1, accumulate=2)
    due = []
    for parts in ([0.25, 0.5], [1.0, 2.0], []):
        for part in parts:
            feed.add(torch.tensor(part, requires_grad=True) * 1.0)
        due += feed.close_step()
    assert [s.loss for s in due] == [0.75, 3.0]  # each step one block late


def test_a_dropped_loss_scale_marks_the_step_skipped() -> None:
    """GradScaler halves its scale after a step with inf gradients, which it did not apply."""
    feed = LossFeed(readback_every=2)
    scales = [65536.0, 65536.0, 32768.0, 32768.0, 65536.0, 65536.0, 65536.0, 65536.0]
    out = run(feed, [1.0] * 8, scales)
    assert [s.skipped for s in out] == [False, False, True, False, False, False]


def test_a_dropped_scale_with_a_non_finite_loss_is_a_counted_skipped_update() -> None:
    """GradScaler skipped the update because the loss itself is NaN/inf, not because its scale
    overflowed the gradients: handed out as a counted step whose update was not applied."""
    feed = LossFeed(readback_every=2)
    out = run(feed, [1.0, math.inf, 1.0, 1.0], [8.0, 4.0, 4.0, 4.0]) + feed.flush()
    assert [(s.skipped, s.update_skipped) for s in out] == [
        (False, False),
        (False, True),
        (False, False),
        (False, False),
    ]


def test_a_step_without_a_loss_is_skipped_and_does_not_reset_the_scale() -> None:
    feed = LossFeed(readback_every=2)
    out = run(feed, [1.0, math.nan, 2.0, 3.0, 4.0, 5.0], [8.0, 8.0, 4.0, 4.0, 4.0, 4.0])
    assert [(s.skipped, s.loss if not s.skipped else None) for s in out] == [
        (False, 1.0),
        (True, None),
        (True, None),  # the scale dropped 8 -> 4: GradScaler skipped step 2
        (False, 3.0),
    ]


def test_reduce_runs_once_per_block_on_the_stacked_block() -> None:
    calls: list[torch.Tensor] = []

    def mean_with_other_rank(block: torch.Tensor) -> torch.Tensor:
        calls.append(block.clone())
        return (block + 2.0 * block) / 2.0  # "another rank" saw twice the loss

    feed = LossFeed(readback_every=4, reduce=mean_with_other_rank)
    out = run(feed, [1.0, 2.0, 3.0, 4.0] * 3)
    assert len(calls) == 3
    assert [s.loss for s in out] == [1.5, 3.0, 4.5, 6.0, 1.5, 3.0, 4.5, 6.0]


@pytest.mark.parametrize("cut", [1, 3, 4, 6, 9])
def test_state_round_trip_mid_block_gives_the_same_future(cut: int) -> None:
    losses = [0.5 + 0.1 * i for i in range(20)]
    scales = [16.0] * 7 + [8.0] * 13
    whole = run(LossFeed(readback_every=3), losses, scales)

    first = LossFeed(readback_every=3)
    head = run(first, losses[:cut], scales[:cut])
    resumed = LossFeed(readback_every=3)
    resumed.load_state_dict(first.state_dict())
    tail = run(resumed, losses[cut:], scales[cut:])
    assert head + tail == whole


def mean_with_a_rank_seeing_a_third_more(block: torch.Tensor) -> torch.Tensor:
    """A stand-in for the cross-rank mean (in place, as ``dist.all_reduce`` works): the other
    rank's losses (< 8 here) are a third higher, its loss scales (16) the same; a second mean
    of a mean would show (x 7/6 again)."""
    other = torch.where(block < 8.0, block * (4.0 / 3.0), block)
    block.add_(other)
    return block / 2.0


@pytest.mark.parametrize("cut", [1, 3, 4, 6, 9])
def test_state_round_trip_under_a_reduce_gives_the_same_future(cut: int) -> None:
    """The open rows are saved averaged across ranks (as every rank will read them), and the
    resumed feed does not average them a second time."""
    losses = [0.5 + 0.05 * i for i in range(20)]
    scales = [16.0] * 20
    reduce = mean_with_a_rank_seeing_a_third_more
    whole = run(LossFeed(readback_every=3, reduce=reduce), losses, scales)

    first = LossFeed(readback_every=3, reduce=reduce)
    head = run(first, losses[:cut], scales[:cut])
    state = first.state_dict()
    assert [row[0] for row in state["rows"]] == pytest.approx(
        [loss * 7 / 6 for loss in losses[cut - cut % 3 : cut]]
    )
    resumed = LossFeed(readback_every=3, reduce=reduce)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["rows"] == state["rows"]  # saving again changes nothing
    tail = run(resumed, losses[cut:], scales[cut:])
    assert head + tail == whole
    assert [s.loss for s in whole] == pytest.approx([loss * 7 / 6 for loss in losses[:15]])


def test_a_short_accumulation_window_is_scaled_back_to_a_mean() -> None:
    """Lightning divides every micro-batch loss by ``accumulate_grad_batches``, also in the
    last window of an epoch when it has fewer micro-batches: the feed undoes that."""
    feed = LossFeed(readback_every=1, accumulate=4)
    due = []
    for window in (4, 4, 2, 4, 1):  # micro-batches per optimizer step; each loss 1.0 / 4
        for _ in range(window):
            feed.add(torch.tensor(0.25))
        due += feed.close_step()
    assert [s.loss for s in due + feed.flush()] == [1.0] * 5


def test_a_manual_step_over_several_batches_gets_their_mean() -> None:
    """Manual optimization: the losses ``training_step`` returns are not divided by anything;
    a step over 3 batches (the user steps every 3rd) gets their mean, not their sum."""
    feed = LossFeed(readback_every=1, accumulate=1)
    for value in (1.0, 2.0, 6.0):
        feed.add(torch.tensor(value))
    assert feed.close_step() == []
    assert [s.loss for s in feed.flush()] == [3.0]


def test_a_first_step_gradscaler_skipped_is_recognized_from_its_starting_scale() -> None:
    feed = LossFeed(readback_every=2, loss_scale=65536.0)
    out = run(feed, [1.0] * 4, [32768.0, 32768.0, 32768.0, 32768.0]) + feed.flush()
    assert [s.skipped for s in out] == [True, False, False, False]
    unknown = LossFeed(readback_every=2)  # without the starting scale it cannot be seen
    out = run(unknown, [1.0] * 4, [32768.0] * 4) + unknown.flush()
    assert [s.skipped for s in out] == [False] * 4


def test_readback_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="readback_every"):
        LossFeed(readback_every=0)


def test_flush_hands_out_every_closed_step_in_order_through_reduce() -> None:
    """At the end of training: the block in flight and the open one, oldest first; the open
    block goes through ``reduce`` (every rank flushes, so the collective matches); a step whose
    micro-batches never reached an optimizer step is dropped."""
    blocks: list[int] = []

    def reduce(block: torch.Tensor) -> torch.Tensor:
        blocks.append(len(block))
        return block

    feed = LossFeed(readback_every=4, reduce=reduce)
    assert run(feed, [float(i) for i in range(6)]) == []  # block 0-3 in flight, 4-5 open
    feed.add(torch.tensor(99.0))  # a micro-batch of a step that never closes
    assert [s.loss for s in feed.flush()] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert blocks == [4, 2]
    assert feed.flush() == []
    assert feed.state_dict()["in_flight"] == [] and feed.state_dict()["rows"] == []
