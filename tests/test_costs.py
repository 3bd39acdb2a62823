"""Calibrated round costs and the per-round controller that turns them into widths."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from test_decode import make_prompt, no_eos, reference
from test_sampling import RUNS, STEPS, assert_same_distribution, exact_distribution
from test_sampling import small_vocab  # noqa: F401

from mlx_blockpilot.bench.drafters import ScriptedDraft
from mlx_blockpilot.costs import (Costs, LearnedCosts, calibrate, load_costs, measure, read_costs, round_code,
                                  write_costs)
from mlx_blockpilot.decode import generate, generate_step
from mlx_blockpilot.options import GenerationOptions
from mlx_blockpilot.schedule import Acceptance, CostAware, make_schedule, session_acceptance


def costs(draft_s=0.1, verify_growth=0.1, read_s=0.0):
    """Synthetic costs: a plain step costs 1 s, each extra verified position ``verify_growth``,
    the drafter reading a feature it has not seen ``read_s``."""
    widths = [1, 2, 4, 8]
    verify = [1.0 + verify_growth * (w - 1) for w in widths]
    return Costs(widths, [1, 10000], [verify, verify], [[0.0] + [draft_s] * 3] * 2, [read_s, read_s * 10000])


def test_costs_interpolate_and_extrapolate():
    c = Costs([1, 2, 4], [100, 1100], [[1.0, 1.2, 1.6], [2.0, 2.4, 3.2]], [[0.0, 0.1, 0.2], [0.0, 0.3, 0.4]])
    assert c.round_s(1, 100) == pytest.approx(1.0)  # plain decoding: no draft pass
    assert c.round_s(3, 100) == pytest.approx(1.4 + 0.15)
    assert c.round_s(2, 600) == pytest.approx(1.8 + 0.2)
    assert c.round_s(8, 100) == pytest.approx(2.4 + 0.4)  # past the widths measured: linear
    assert c.round_s(2, 10) == c.round_s(2, 100)  # before the first context measured: flat
    noisy = Costs([1], [256, 2048], [[1.0], [0.6]], [[0.0], [0.0]])  # a noisy long-context sample
    assert noisy.round_s(1, 100000) == pytest.approx(0.6)  # never extrapolated down to 0 s
    assert Costs.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.catch_up_s(5000) == 0.0  # a calibration without read costs (older files)
    read = Costs([1], [100, 1100], [[1.0], [2.0]], [[0.0], [0.0]], read_s=[0.01, 0.33])
    assert read.catch_up_s(100) == pytest.approx(0.01) and read.catch_up_s(1100) == pytest.approx(0.33)
    assert read.catch_up_s(600) == pytest.approx(600 * (0.0001 + 0.0003) / 2) and read.catch_up_s(0) == 0.0
    assert Costs.from_dict(json.loads(json.dumps(read.to_dict()))) == read


def test_sampled_rounds_cost_what_sampling_adds():
    c = Costs([1, 2, 4], [100, 1100], [[1.0, 1.2, 1.6], [2.0, 2.4, 3.2]], [[0.0, 0.1, 0.2], [0.0, 0.3, 0.4]],
              sample_s=[0.01, 0.05, 0.09])
    assert c.round_s(1, 100, sampled=True) == pytest.approx(1.01)
    assert c.round_s(3, 600, sampled=True) == pytest.approx(c.round_s(3, 600) + 0.07)  # the same at any context
    assert c.round_s(2, 100) == pytest.approx(1.3)  # greedy rounds: without it
    assert Costs.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    older = Costs.from_dict({k: v for k, v in c.to_dict().items() if k != "sample_s"})  # a file from before
    assert older.round_s(2, 100, sampled=True) == older.round_s(2, 100)
    learned = LearnedCosts(c)
    learned.observe(2, 100, 1.35, sampled=True)  # a sampled round timed at its sampled cost: no correction
    learned.observe(4, 100, 1.8, sampled=False)
    assert learned.ratio(2, 100) == pytest.approx(1.0) and learned.ratio(4, 100) == pytest.approx(1.0)
    assert learned.round_s(2, 100, sampled=True) == pytest.approx(1.35)


def test_the_controller_prices_rounds_as_they_are_decoded():
    # Width 2 costs 1.2 plain steps greedy; sampling adds 0.21 to it, 0.01 to a plain step: at a rate
    # of 0.3 drafting is worth 1.3 / 1.2 = 1.08x plain greedily and 1.3 / 1.41 * 1.01 = 0.93x sampling.
    c = replace(costs(), sample_s=[0.01, 0.21, 0.21, 0.21])

    def width(greedy):
        s = make_schedule(2, 2, None, True, c, max_width=2, greedy=greedy)
        s.estimate = Acceptance(0.9, [300.0], [1000.0])
        s.update(1, 2)
        return s.width

    assert width(greedy=True) == 2 and width(greedy=False) == 1
    s = CostAware(2, LearnedCosts(c), 2, context=0, sampled=True)
    s.update(1, 2)
    s.update(1, 2)
    s.observe(1.41)  # the second round (after a drafted one) is timed against its sampled cost
    assert s.costs.ratio(2, 0) == pytest.approx(1.0)


def test_noisy_dips_are_smoothed_out():
    from mlx_blockpilot.costs import monotone

    assert monotone([[1.0, 3.0, 2.0], [0.5, 4.0, 5.0]]) == [[1.0, 3.0, 3.0], [1.0, 4.0, 5.0]]
    assert monotone([]) == []


def test_one_noisy_timing_does_not_bend_the_line():
    from mlx_blockpilot.costs import straight

    widths = [1, 2, 3, 4, 6, 8]
    line = [0.09 + 0.005 * w for w in widths]
    noisy = list(line)
    noisy[1] += 0.03  # one pass caught a pause
    assert straight(widths, noisy) == pytest.approx(line, abs=2e-3)
    assert straight(widths, [0.2, 0.1, 0.1, 0.1, 0.1, 0.1]) == pytest.approx([0.1] * 6)  # never cheaper when wider
    assert straight([4], [0.3]) == [0.3]


def test_widths_not_timed_are_read_off_the_line():
    from mlx_blockpilot.costs import by_width

    # a plain step as timed; drafted widths 2 and 4 timed, 3 and 8 on their line
    assert by_width([1, 2, 3, 4, 8], [1, 2, 4], [1.0, 1.2, 1.4]) == pytest.approx([1.0, 1.2, 1.3, 1.4, 1.8])
    assert by_width([2, 3], [2, 3], [0.5, 0.7]) == pytest.approx([0.5, 0.7])  # no plain width: the line alone


def widths_of(model, draft, tok, prompt, costs, max_tokens=40):
    steps = list(generate_step(model, draft, prompt, GenerationOptions(max_tokens=max_tokens, block_size=2, refine=True),
                               eos=tok.eos_token_ids, costs=costs))
    return [s.width for s in steps[1:]], [t for s in steps for t in s.tokens]


def test_cost_aware_widths_follow_acceptance_and_stay_lossless(qwen3):
    tok = no_eos(qwen3.tokenizer)
    prompt = make_prompt(13, seed=2)
    ref = reference(qwen3.model, prompt, max_tokens=60)
    right = ScriptedDraft(qwen3.draft.config, prompt + ref, qwen3.cfg["vocab_size"])
    wrong = ScriptedDraft(qwen3.draft.config, prompt + ref, qwen3.cfg["vocab_size"], wrong=True)
    # drafts that are always right on cheap rounds: the width climbs (position by position, as
    # each new position's acceptance is observed) towards the largest
    widths, tokens = widths_of(qwen3.model, right, tok, prompt, costs(), 60)
    assert tokens == ref and max(widths) >= 7 and widths[:-2] == sorted(widths[:-2])
    # drafts that are always wrong: plain decoding, with a drafted probe now and then
    widths, tokens = widths_of(qwen3.model, wrong, tok, prompt, costs(), 60)
    assert tokens == ref and widths.count(1) > len(widths) // 2 and 2 in widths[widths.index(1):]
    # the real (random) drafter, every width lossless
    for c in (costs(), costs(draft_s=0.0, verify_growth=0.0), costs(draft_s=2.0)):
        r = generate(qwen3.model, qwen3.draft, tok, prompt, block_size=3, max_tokens=60, refine=True, costs=c)
        assert r.tokens == ref


def test_cost_aware_rule():
    s = CostAware(4, costs(), max_width=8, context=0, prior=0.5)
    for _ in range(30):
        s.update(8, 8)  # every draft accepted
    assert s.width == 8 and min(s.rates()) > 0.9
    for _ in range(60):  # nothing accepted (failed probes at width 8 cost 0.8 plain steps: one per 27 rounds)
        s.update(1, s.width)
    assert s.width in (1, 2) and s.rates()[0] < 0.1


def test_the_pick_is_left_for_a_narrower_width_only_when_faster_by_more_than_trust():
    # Width 2 costs 1.2 plain steps: at acceptance rate r it is worth (1 + r) / 1.2 of plain.
    def width(pick, rate, trust, max_width=2):
        s = CostAware(pick, costs(), max_width, context=0, prior=rate, prior_rounds=1000, trust=trust, margin=0.0)
        s.update(1, pick)  # one round; the prior's 1000 rounds keep the rate
        return s.width

    assert width(2, 0.15, trust=0.0) == 1  # 0.96x of plain: plain
    assert width(2, 0.15, trust=0.1) == 2  # within the pick's trust: kept
    assert width(2, 0.0, trust=0.1) == 1  # 0.83x: plain all the same
    assert width(1, 0.3, trust=0.1) == 2  # from a plain pick up to drafting at 1.08x: no trust needed
    assert width(1, 0.0, trust=0.1) == 1  # 0.83x: stays plain
    # At r = 0.3 width 2 beats the picked 3 by 1.3%: only a controller without trust moves.
    assert width(3, 0.3, trust=0.0, max_width=3) == 2
    assert width(3, 0.3, trust=0.1, max_width=3) == 3


def test_drafting_is_left_for_plain_decoding_only_when_that_is_faster_by_more_than_margin():
    # Width 2 costs 1.2 plain steps: at acceptance rate r it is worth (1 + r) / 1.2 of plain.
    def width(rate, margin, trust=0.0, last=2):
        s = CostAware(2, costs(), 2, context=0, prior=rate, prior_rounds=1000, trust=trust, margin=margin)
        s.update(1, last)  # one round; the prior's 1000 rounds keep the rate
        return s.width

    assert width(0.15, margin=0.05) == 2  # after a drafted round at 0.96x of plain: drafting is kept
    assert width(0.15, margin=0.0) == 1
    assert width(0.1, margin=0.05) == 1  # 0.92x: plain
    assert width(0.15, margin=0.05, last=1) == 1  # after a plain round: plain, as the estimates say
    assert width(0.25, margin=0.05, last=1) == 2  # and back up to drafting at 1.04x: no margin needed
    # the pick's trust and the margin are not compounded: the larger applies (0.875x: plain is 14% faster)
    assert width(0.05, margin=0.05, trust=0.1) == 1 and width(0.1, margin=0.05, trust=0.1) == 2
    # the generation's start is judged on the estimates (0.96x of plain: the pick 2 is not started)
    assert CostAware(2, costs(), 2, context=0, prior=0.15, prior_rounds=1000, trust=0.0, margin=0.05).width == 1


def test_the_pick_is_trusted_when_decoding_greedily_only(qwen3):
    # The policy learned from greedy acceptance: a sampling generation's controller moves on its estimates.
    def width(greedy):
        s = make_schedule(3, 3, None, True, costs(), max_width=3, greedy=greedy)
        s.estimate = Acceptance(0.9, [300.0, 300.0], [1000.0, 1000.0])  # r = 0.3: width 2 is 1.3% faster than 3
        s.update(1, 3)
        return s.width

    assert width(greedy=True) == 3
    assert width(greedy=False) == 2
    # Through decoding: after a first round at the pick (3) keeps nothing, width 2 is expected 4.7% faster
    # than 3 (rates 0.32 and 0.5 at a round cost of 1.2 and 1.41 plain steps).
    prompt = make_prompt(13, seed=2)
    wrong = ScriptedDraft(qwen3.draft.config, prompt + reference(qwen3.model, prompt, max_tokens=8),
                          qwen3.cfg["vocab_size"], wrong=True)
    c = Costs([1, 2, 3], [1, 10000], [[1.0, 1.2, 1.41]] * 2, [[0.0, 0.0, 0.0]] * 2)
    for temperature, second in ((0.0, 3), (0.7, 2)):
        opts = GenerationOptions(max_tokens=8, block_size=3, refine=True, temperature=temperature, seed=0)
        steps = list(generate_step(qwen3.model, wrong, prompt, opts, costs=c))
        assert len(steps[1].tokens) == 1  # the first round kept no draft
        assert [s.width for s in steps[1:3]] == [3, second]


def test_trust_does_not_pay_for_a_long_read():
    # A read of 8,000 unseen features costs 8 plain steps; width 2 at rate 0.3 saves 0.08 s a
    # token (4.9 s over 64), trusted by 0.2 it would seem to save 0.23 s a token (14.8 s).
    def width(unread, rate, trust):
        return CostAware(2, costs(read_s=1e-3), 2, context=8000, unread=unread, remaining=64, prior=rate,
                         prior_rounds=1000, trust=trust).width

    assert width(8000, 0.3, trust=0.2) == 1  # the long read is judged on the estimates alone
    assert width(8000, 0.6, trust=0.0) == 2  # 1.6 / 1.2 s: 16 s saved, paid back
    assert width(500, 0.15, trust=0.0) == 1  # a cheap read (0.5 s), width 2 at 0.96x: plain
    assert width(500, 0.15, trust=0.2) == 2  # trusted


def test_the_load_moves_the_drafters_read_as_it_moves_rounds():
    """The read of 900 unseen features costs 0.9 plain steps as calibrated. Whether it counts
    as cheap (a probe may pay it; the pick's trust applies) does not flip with the machine's
    load, which slows the read as it slows a plain step (priced apart, a plain step and the
    read of a ~2k prompt's features traded places with the load on the demo)."""
    for load in (0.5, 1.0, 2.0):
        learned = LearnedCosts(costs(read_s=1e-3))
        learned.observe(1, 900, load * 1.0, rounds=16)
        assert learned.catch_up_s(900) == pytest.approx(load * 0.9)
        s = CostAware(2, learned, 2, context=900, unread=900, trust=0.2, prior=0.15, prior_rounds=1000)
        assert s.read_is_cheap() and s.width == 2  # trusted: width 2 at 0.96x of plain is kept


def relative(learned, width, c, context=100):
    """What ``learned`` prices a round of ``width`` at against a plain step, over what calibration ``c`` says."""
    return (learned.round_s(width, context) / learned.round_s(1, context)) / (c.round_s(width, context) / c.round_s(1, context))


def test_learned_costs_split_the_load_from_what_each_width_costs():
    c = costs()  # plain 1 s, width 2 1.2 s, width 4 1.4 s, width 8 1.8 s
    learned = LearnedCosts(c)
    assert learned.round_s(4, 100) == c.round_s(4, 100)  # nothing timed yet: the calibration
    learned.observe(4, 100, 2 * c.round_s(4, 100))  # the machine twice as slow: so at every width and context
    assert learned.round_s(1, 100) == pytest.approx(2.0) and learned.round_s(8, 9000) == pytest.approx(
        2 * c.round_s(8, 9000))
    for k in range(45):  # width 4 really costs 1.5x its calibration against plain; spells of load come and go
        load = 1.4 if k % 10 >= 5 else 1.0
        learned.observe(1, 100, load * 1.0, rounds=16)  # a run of plain rounds timed as one: the load now
        assert learned.round_s(1, 100) == pytest.approx(load, rel=1e-3)
        learned.observe(4, 100, load * 1.5 * c.round_s(4, 100))
    assert relative(learned, 4, c) == pytest.approx(1.5, rel=0.02)
    assert learned.round_s(1, 100) == pytest.approx(1.0, rel=0.02)  # no spell now
    assert relative(learned, 8, c) == pytest.approx(1.5, rel=0.02)  # past the widths timed: as the last one
    assert math.log(relative(learned, 2, c)) == pytest.approx(math.log(1.5) / 3, rel=0.05)  # between: in logs
    learned.observe(4, 100, 100.0)  # a round caught a pause: counted as 65% off (``clip``), it moves prices little
    learned.observe(1, 100, 1.0, rounds=16)
    assert learned.round_s(1, 100) == pytest.approx(1.0, rel=0.02)
    assert relative(learned, 4, c) == pytest.approx(1.5, rel=0.05)
    assert learned.catch_up_s(100) == c.catch_up_s(100)


def test_a_width_timed_in_a_slow_spell_is_not_priced_by_it():
    """Width 2 was timed only while the machine was slow (every round twice its cost), width 4
    only since: both are priced against plain as they compare at any one load (as per-width
    averages of their rounds they would not be: width 2 at twice width 4's correction)."""
    c = costs()
    learned = LearnedCosts(c)
    for _ in range(5):  # the spell: plain runs and width 2 in turn
        learned.observe(1, 100, 2.0, rounds=16)
        learned.observe(2, 100, 2 * c.round_s(2, 100))
    learned.observe(1, 100, 2.0, rounds=16)
    learned.observe(1, 100, 1.0, rounds=16)  # over
    for _ in range(5):
        learned.observe(4, 100, c.round_s(4, 100))
        learned.observe(1, 100, 1.0, rounds=16)
    assert relative(learned, 2, c) == pytest.approx(1.0) and relative(learned, 4, c) == pytest.approx(1.0)
    assert learned.round_s(2, 100) == pytest.approx(c.round_s(2, 100))


def test_learned_costs_count_the_rounds_timed_lately():
    """``recent``: rounds of a width among the last ``max_age`` timed (of any width; a plain run
    counts its rounds)."""
    learned = LearnedCosts(costs(), max_age=10)
    for _ in range(3):
        learned.observe(2, 100, 1.2)  # rounds 1 to 3
    learned.observe(1, 100, 1.0, rounds=8)  # to round 11: the first round of width 2 ten rounds ago
    assert learned.recent(2) == 3 and learned.recent(1) == 1 and learned.recent(4) == 0
    learned.observe(1, 100, 1.0)
    assert learned.recent(2) == 2
    learned.observe(1, 100, 1.0, rounds=2)
    assert learned.recent(2) == 0 and learned.timed[2] == 3  # what this session timed, for keeping: unchanged


def by_context(corrections=None):
    """Synthetic costs calibrated at three context lengths (plain 1 s, width 2 1.2 s at each)."""
    widths, contexts = [1, 2, 4], [256, 2048, 8192]
    verify = [[1.0, 1.1, 1.3]] * 3
    return Costs(widths, contexts, verify, [[0.0, 0.1, 0.1]] * 3, corrections=corrections or {})


def test_learned_costs_correct_each_context_length_apart(tmp_path):
    """Width 2 really costs 1.5x its calibration against plain after short prompts and as
    calibrated after ~2k tokens (as the demo's rounds did, 1.21x / 1.03x): each context length
    keeps its own correction, between two calibrated ones interpolated, where nothing was timed
    the calibration; the file keeps them by context."""
    path = tmp_path / "calibration.json"
    c = by_context()
    write_costs(c, path)
    learned = LearnedCosts(c, path=path)

    def pairs(context, factor, n=12):
        for _ in range(n):
            learned.observe(1, context, c.round_s(1, context), rounds=16)
            learned.observe(2, context, factor * c.round_s(2, context))

    pairs(100, 1.5)
    pairs(2048, 1.0)
    assert relative(learned, 2, c, 100) == pytest.approx(1.5, rel=0.03)
    assert relative(learned, 2, c, 2048) == pytest.approx(1.0, rel=0.03)
    assert math.log(relative(learned, 2, c, 1152)) == pytest.approx(math.log(1.5) / 2, rel=0.1)  # halfway, in logs
    assert relative(learned, 2, c, 8192) == pytest.approx(1.0, rel=0.03)  # never timed: as calibrated
    pairs(4000, 1.3, n=40)  # between two calibrated contexts: the correction there follows as it would at one
    assert relative(learned, 2, c, 4000) == pytest.approx(1.3, rel=0.05)
    assert relative(learned, 2, c, 100) == pytest.approx(1.5, rel=0.03)  # the short context's untouched
    kept = read_costs(path).corrections
    assert set(kept) == {256, 2048, 8192}  # each moved by rounds around it
    assert kept[256][2] / kept[256][1] == pytest.approx(1.5, rel=0.05)
    later = LearnedCosts(read_costs(path))
    for context in (100, 1152, 4000, 8192):
        assert relative(later, 2, c, context) == pytest.approx(relative(learned, 2, c, context), rel=0.05)


def test_corrections_by_width_alone_hold_at_every_context_length():
    """A calibration file from before corrections were kept by context: its factors hold everywhere."""
    older = dict(by_context().to_dict(), corrections={"2": 1.2})
    c = Costs.from_dict(json.loads(json.dumps(older)))
    assert c.corrections == {256: {2: 1.2}, 2048: {2: 1.2}, 8192: {2: 1.2}}
    learned = LearnedCosts(c)
    for context in (10, 1000, 2048, 20000):
        assert learned.ratio(2, context) == pytest.approx(1.2) and learned.ratio(1, context) == pytest.approx(1.2)
    assert Costs.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(TypeError, match="corrections mix"):
        Costs.from_dict(dict(older, corrections={"2": 1.2, "256": {"2": 1.1}}))


def test_learned_costs_are_kept_for_the_next_session(tmp_path):
    path = tmp_path / "calibration.json"
    c = costs()  # a calibration taken while the machine was busy: width 4 really costs 1.5x as much against plain
    write_costs(c, path)
    learned = LearnedCosts(c, path=path)

    def pairs(session, n, factor, load=1.0):
        for _ in range(n):
            session.observe(1, 100, load * 1.0, rounds=16)
            session.observe(4, 100, load * factor * c.round_s(4, 100))

    pairs(learned, 7, 1.5)
    assert read_costs(path) == c  # too few rounds to keep
    pairs(learned, 1, 1.5)
    corrections = read_costs(path).corrections
    assert set(corrections) == {1}  # where it moved by more than tolerance: 10000 has a 1% share at 100
    kept = corrections[1]
    assert set(kept) == {1, 4} and kept[4] / kept[1] == pytest.approx(1.5, rel=0.05)
    assert read_costs(path).measured() == c
    for _ in range(10):  # width 2 as calibrated against plain: plain's correction
        learned.observe(2, 100, c.round_s(2, 100) * learned.ratio(1, 100))
        learned.observe(1, 100, learned.round_s(1, 100), rounds=16)
    kept = read_costs(path).corrections[1]
    assert kept[2] / kept[1] == pytest.approx(1.0, rel=0.05) and kept[4] / kept[1] == pytest.approx(1.5, rel=0.05)
    assert not list(tmp_path.glob("*.tmp"))  # written whole: no temporary file left

    later = LearnedCosts(read_costs(path), path=path)  # the next session starts from it
    assert relative(later, 4, c) == pytest.approx(1.5, rel=0.05)
    pairs(later, 1, 1.0)  # a pair of rounds caught as calibrated does not undo it: it counts as `prior` pairs
    assert relative(later, 4, c) > 1.15
    before = relative(later, 4, c)
    later.interrupt()  # a later generation, at a quiet moment: every round faster, width 4 as dear against plain
    pairs(later, 3, before, load=0.5)
    assert relative(later, 4, c) == pytest.approx(before, rel=0.01)
    assert later.round_s(1, 100) == pytest.approx(0.5, rel=1e-3)
    pairs(later, 40, 1.0)  # the machine changed: the correction follows, in the file too
    assert relative(later, 4, c) == pytest.approx(1.0, rel=0.05)
    kept = read_costs(path).corrections[1]
    assert kept[4] / kept[1] == pytest.approx(1.0, abs=0.1)

    # Measured again meanwhile (calibrate --force in another process): that calibration stays.
    fresh = costs(draft_s=0.2)
    write_costs(fresh, path)
    pairs(later, 8, 1.5)
    assert read_costs(path) == fresh and later.path is None and relative(later, 4, c) > 1.3  # still learned, in memory


def test_learned_costs_that_cannot_be_kept_last_the_session(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    write_costs(costs(), path)
    before = path.read_text()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("mlx_blockpilot.costs.os.replace", refuse)
    learned = LearnedCosts(costs(), path=path)
    with pytest.warns(UserWarning, match="cannot save the calibration to .*calibration.json .*this session only"):
        for _ in range(8):  # width 2 at 1.5x its calibration against plain
            learned.observe(1, 100, 1.0, rounds=16)
            learned.observe(2, 100, 1.8)
    assert path.read_text() == before and not list(tmp_path.glob(".*tmp"))  # untouched, nothing half-written
    assert learned.path is None and relative(learned, 2, costs()) > 1.3  # still learned, in memory


def test_controller_moves_off_a_width_that_times_slower_than_calibrated():
    def run(true_s):
        s = CostAware(4, LearnedCosts(costs()), 8, context=100, trust=0.0)  # the estimates alone
        widths = []
        for _ in range(40):
            w = s.width
            s.update(min(w, 3), w)  # the first two drafts always accepted, never a third
            s.observe(true_s(w))
            widths.append(w)
        return widths

    assert run(lambda w: costs().round_s(w, 100))[-1] == 3  # timed as calibrated: width 3 (two drafts and the target's token)
    slow = run(lambda w: costs().round_s(w, 100) * (1 if w < 3 else 1.5))  # width 3 up costs half as much again
    assert slow[-1] == 2 and slow.count(2) > 20


def test_a_run_of_drafted_rounds_times_plain_decoding_too():
    """Calibration priced width 2 at 1.2 plain steps; it really costs 1.6 (as after a ~2k prompt
    here), and at a rate of 0.3 it is then slower than plain decoding (1.3 / 1.6). Timed alone its
    rounds only move the load; a plain round tried now and then prices it against plain, and
    decoding goes plain (probes apart)."""

    def run(explore):
        learned = LearnedCosts(costs())
        s = CostAware(2, learned, 2, context=100, remaining=10_000, trust=0.0, prior=0.3, prior_rounds=1e6,
                      explore=explore)
        widths = []
        for _ in range(120):
            w = s.width
            s.update(1 + (w > 1 and len(widths) % 10 < 3), w)  # 3 of every 10 drafts kept
            s.observe(costs().round_s(w, 100) * (1.6 / 1.2 if w > 1 else 1.0))
            widths.append(w)
        return widths, learned

    widths, learned = run(explore=3)
    assert 1 in widths[:10]  # a plain round tried early in a run of drafted ones
    assert widths[-60:].count(1) > 45 and relative(learned, 2, costs()) == pytest.approx(1.6 / 1.2, rel=0.1)
    widths, learned = run(explore=0)  # not tried: width 2 throughout, priced as calibrated against plain
    assert widths == [2] * 120 and relative(learned, 2, costs()) == pytest.approx(1.0)
    # a probe from plain decoding drafts (the plain rounds before it are timed once it ends them)
    s = CostAware(1, LearnedCosts(costs()), 8, context=100, remaining=10_000, prior=0.1, prior_rounds=1e6)
    assert probe_gaps(s, 30)[0] <= 9


def test_a_stale_kept_correction_is_tried_and_outvoted():
    """Width 2 was kept as three times dearer than calibrated (learned under another load) and
    really costs what calibration measured: it is tried as a neighbour of the best width, and
    its rounds outvote the kept value, when drafting and when probing from plain decoding."""

    def run(pick, committed):
        learned = LearnedCosts(replace(costs(), corrections={2: 3.0}))
        s = CostAware(pick, learned, 8, context=100, remaining=10_000, trust=0.0)
        widths = []
        for _ in range(200):
            w = s.width
            s.update(min(w, committed), w)
            s.observe(costs().round_s(w, 100))
            widths.append(w)
        return widths, learned

    widths, learned = run(3, committed=2)  # the first draft always accepted, never a second: width 2 is best
    assert learned.ratio(2, 100) == pytest.approx(1.0) and widths[-50:] == [2] * 50
    widths, learned = run(1, committed=1)  # every draft rejected: plain decoding, and probes
    assert learned.ratio(2, 100) == pytest.approx(1.0) and widths.count(2) >= 3 and widths[-50:].count(1) > 40


def test_a_width_timed_in_a_slow_spell_is_not_avoided_after_it():
    """Width 2 was timed alone while the machine was slow (every round twice its cost) and is
    the best width at normal load: the spell was the load's, not width 2's, and it is chosen."""
    learned = LearnedCosts(costs())
    for _ in range(6):
        learned.observe(2, 100, 2 * costs().round_s(2, 100))
    s = CostAware(3, learned, 8, context=100, remaining=10_000, trust=0.0)
    widths = []
    for _ in range(100):
        w = s.width
        s.update(min(w, 2), w)  # the first draft always accepted, never a second: width 2 is best
        s.observe(costs().round_s(w, 100))
        widths.append(w)
    assert widths[-50:] == [2] * 50
    assert relative(learned, 2, costs()) == pytest.approx(1.0, abs=0.05) and learned.ratio(2, 100) == pytest.approx(1.0, abs=0.05)


def test_neighbours_timed_long_ago_are_timed_again():
    learned = LearnedCosts(costs(), max_age=20)
    for w in (2, 4):  # an earlier generation timed both neighbours of width 3
        for _ in range(5):
            learned.observe(w, 100, costs().round_s(w, 100))
    seen = Acceptance(0.995, hits=[100, 100, 0], seen=[100, 100, 100])  # two drafts kept, never a third
    s = CostAware(3, learned, 8, context=100, remaining=10_000, trust=0.0, acceptance=seen)
    widths = []
    for _ in range(60):
        w = s.width
        s.update(min(w, 3), w)  # as the session saw: width 3 is best
        s.observe(costs().round_s(w, 100))
        widths.append(w)
    assert widths[:10] == [3] * 10  # timed lately: not tried
    assert widths.count(2) == 3 and widths.count(4) == 3  # forgotten: tried again (a generation's `explore`)


def test_neighbours_are_tried_a_few_times_per_generation_when_nothing_is_timed():
    """Profiling (``generate_step(timed=True)``) times no round: a neighbour is then tried
    ``explore`` times in a generation, not every round."""
    s = CostAware(3, LearnedCosts(costs()), 8, context=100, remaining=10_000, trust=0.0)
    widths = []
    for _ in range(60):
        widths.append(s.width)
        s.update(min(s.width, 3), s.width)  # two drafts accepted, never a third: width 3 is best
    assert widths.count(2) == 3 and widths.count(4) == 3 and widths[-40:] == [3] * 40


class Timings(LearnedCosts):
    """``LearnedCosts`` that also lists what it was told: (width, seconds per round, rounds)."""

    def __init__(self, costs):
        super().__init__(costs)
        self.told = []

    def observe(self, width, context, seconds, rounds=1, sampled=False):
        self.told.append((width, pytest.approx(seconds), rounds))
        super().observe(width, context, seconds, rounds, sampled)


def test_plain_rounds_are_timed_as_a_run():
    learned = Timings(costs(read_s=0.1))  # the drafter reads a feature it has not seen in 0.1 s
    s = CostAware(1, learned, 8, context=100)
    s.width = 1
    for seconds in (2.0, 0.0, 1.0, 1.0):  # a round built ahead on the first is waited for with it
        s.update(1, 1)
        s.observe(seconds)
    assert not learned.told  # the run goes on
    s.update(3, 4)
    s.observe(1.4 + 0.4)  # a drafted round ends it; its drafter first read the 4 plain rounds' features
    assert learned.told == [(1, 1.0, 4), (4, 1.4, 1)]
    assert learned.round_s(1, 100) == pytest.approx(1.0) and learned.round_s(4, 100) == pytest.approx(1.4)
    s.update(3, 4)
    s.observe(2 * 1.4 + 0.3)  # one after a drafted round, whose 3 kept inputs it read
    assert learned.told[-1] == (4, 2.8, 1)
    first = CostAware(4, learned, 8, context=100, unread=50)  # a generation's first round reads the prompt
    first.update(3, 4)
    first.observe(30.0)
    assert len(learned.told) == 3  # not taken as what width 4 costs


def test_plain_rounds_built_ahead_are_timed_by_the_work_between_syncs():
    """As decoding times them: the first plain round after a drafted one waits for the next
    one too, the last (nothing built after it) waits for little; 1 s of work per round."""
    learned = Timings(costs())
    s = CostAware(2, learned, 8, context=100, trust=0.0)

    def stretch(plain):
        s.update(2, 2)
        s.observe(1.2)
        for k in range(plain):
            s.update(1, 1)
            s.observe(1.9 if k == 0 else 0.1 if k == plain - 1 else 1.0)

    for _ in range(3):  # short stretches, each timed whole
        stretch(3)
    s.update(2, 2)
    s.observe(1.2)
    assert [t for t in learned.told if t[0] == 1] == [(1, 1.0, 3)] * 3  # 3 s of rounds over 3 rounds each time
    for _ in range(3):  # long ones: windows inside them, the short-timed ends dropped
        stretch(20)
    s.update(2, 2)
    s.observe(1.2)
    assert [t for t in learned.told if t[0] == 1][3:] == [(1, 1.0, 16)] * 3  # a window of each


def test_a_generation_starts_from_the_sessions_acceptance():
    acceptance = session_acceptance()
    first = CostAware(4, costs(), 8, context=100, acceptance=acceptance)
    assert first.rates() == [0.5] * 7  # nothing seen yet: the blind prior
    for _ in range(50):
        first.update(2, 4)  # one draft kept, the second rejected
    assert acceptance.rates()[:2] == [pytest.approx(1.0), 0.0] and len(acceptance.rates()) == 2
    second = CostAware(4, costs(), 8, context=100, acceptance=acceptance, trust=0.0)  # the estimates alone
    assert second.rates()[0] > 0.95 and second.rates()[1] < 0.05 and second.rates()[2] == 0.5
    blind = CostAware(4, costs(), 8, context=100, trust=0.0)
    for s in (second, blind):  # the policy's pick first, then one round like the session's
        assert s.width == 4
        s.update(2, 4)
    assert (second.width, blind.width) == (2, 3)  # the session's rates already steer; the blind prior's barely


def test_sampled_rounds_count_each_drafts_expected_acceptance():
    counted = Acceptance(memory=1.0)
    counted.observe(0, 3, expected=[0.4, 0.9, 0.8])  # rejected at once: only the first draft was judged as kept-or-not
    counted.observe(2, 3, expected=[0.7, 0.6, 0.5])
    assert counted.hits == pytest.approx([1.1, 0.6, 0.5]) and counted.seen == [2.0, 1.0, 1.0]
    outcomes = Acceptance(memory=1.0)  # greedy rounds: whether each draft was kept
    outcomes.observe(0, 3)
    outcomes.observe(2, 3)
    assert outcomes.hits == [1.0, 1.0, 0.0] and outcomes.seen == [2.0, 1.0, 1.0]


def test_sampled_decoding_teaches_the_controller_expected_acceptance(small_vocab):  # noqa: F811
    model, draft = small_vocab
    learned = {}
    for temperature in (0.0, 1.0):
        acceptance = Acceptance(memory=1.0)  # sums: whole numbers when it counts outcomes
        opts = GenerationOptions(max_tokens=40, block_size=3, refine=True, temperature=temperature, seed=0)
        list(generate_step(model, draft, [1, 4, 2], opts, costs=costs(draft_s=0.01, verify_growth=0.05),
                           acceptance=acceptance))
        assert acceptance.seen and acceptance.seen[0] >= 3, "the test should draft"
        learned[temperature] = acceptance.hits
    assert all(h == int(h) for h in learned[0.0])  # greedy: kept or not
    assert any(abs(h - round(h)) > 1e-3 for h in learned[1.0])  # sampled: probabilities of being kept


def test_drafting_starts_only_when_the_drafters_catch_up_pays_back():
    # B=3 with the prior: 1.75 tokens per 1.3 s against 1 per 1 s plain: ~0.26 s saved per token
    cheap, slow = costs(read_s=1e-4), costs(read_s=0.01)
    assert CostAware(3, cheap, 8, context=8000, unread=8000, remaining=64).width == 3  # 0.8 s read, paid back
    assert CostAware(3, slow, 8, context=8000, unread=8000, remaining=64).width == 1  # 80 s read: plain
    assert CostAware(3, slow, 8, context=8000, unread=8000, remaining=1000).width == 1  # the horizon caps the saving
    assert CostAware(3, slow, 8, context=8000, unread=10, remaining=64).width == 3  # a short prompt
    assert CostAware(3, cheap, 8, context=8000, unread=8000, remaining=2).width == 1  # too few tokens left
    s = CostAware(3, slow, 8, context=8000, unread=8000, remaining=500)
    for _ in range(40):  # plain rounds: no probe while reading the backlog costs more than a plain step
        s.update(1, 1)
        assert s.width == 1
    s = CostAware(3, slow, 8, context=8000, unread=0, remaining=500)
    for _ in range(6):
        s.update(1, s.width)  # drafts rejected: plain, then a probe once the backlog is cheap to read
    widths = []
    for _ in range(30):
        s.update(1, s.width)
        widths.append(s.width)
    assert widths.count(1) > 20 and max(widths) > 1


def test_probes_are_spaced_by_what_a_failed_one_costs():
    def probes(c, rounds=200):
        s = CostAware(2, c, 8, context=100, remaining=1000, backoff=0)
        widths = []
        for _ in range(rounds):
            s.update(1, s.width)  # every draft rejected
            widths.append(s.width)
        return sum(w > 1 for w in widths[20:])

    assert probes(costs(verify_growth=0.1)) >= 15  # a drafted round costs 1.2 plain steps: every 8 plain rounds
    assert 3 <= probes(costs(verify_growth=1.0)) <= 6  # 2.1 plain steps: one per ~37, failed probes cost < 3%


def test_a_probe_that_reads_a_long_prompt_waits_for_that_read_too():
    # After a 2,000-token prompt the drafter's first read costs 0.9 plain steps: the first probe,
    # failing, wastes that and 0.2 plain steps more, so it comes after ~37 plain rounds (3%), the
    # next ones (a read of a few features) every 8; every draft rejected, drafting never expected to pay
    def gaps(read_s):
        s = CostAware(1, costs(verify_growth=0.1, read_s=read_s), 8, context=2000, unread=2000, remaining=10000,
                      backoff=0, prior=0.1, prior_rounds=1000)
        return probe_gaps(s, 120)

    first, *rest = gaps(0.0)
    assert first <= 9 and rest[:3] == [8, 8, 8]  # (the first gap counts the generation's first round)
    first, *rest = gaps(4.5e-4)
    assert 36 <= first <= 40 and rest[:3] == [8, 8, 8]


def probe_gaps(s, rounds, committed=lambda width: 1):
    """Plain rounds between ``s``'s drafted rounds over ``rounds`` rounds (``committed(width)``
    tokens per round)."""
    gaps, plain = [], 0
    for _ in range(rounds):
        width = s.width
        if width > 1:
            gaps.append(plain)
            plain = 0
        else:
            plain += 1
        s.update(committed(width), width)
    return gaps


def from_first_probe(gaps):
    """``gaps`` from the first probe on, after the first drafted rounds (the prior's)."""
    return gaps[next(i for i, g in enumerate(gaps) if i and g):]


def test_failed_probes_back_off_and_a_probe_that_pays_resets_them():
    # every draft rejected: after the prior's first drafted rounds, plain decoding with probes whose
    # interval (8 plain rounds: a failed one costs 0.2 plain steps) doubles each time, up to 8x
    # (drafting is then expected far slower than plain: each probe goes back to plain)
    s = CostAware(1, costs(verify_growth=0.1), 8, context=100, remaining=10000, backoff=3)
    assert from_first_probe(probe_gaps(s, 300)) == [8, 16, 32, 64, 64, 64]
    # drafts accepted again: the next probe is stayed after, and the backoff is gone
    probe_gaps(s, 100, committed=lambda width: width)
    assert s.failed == 0 and s.width > 1
    # rejected again: the first probe comes after the base interval (of the wider width now best), not 64 rounds
    gaps = [g for g in probe_gaps(s, 200) if g]
    assert 8 <= gaps[0] < 64 and max(gaps) >= 2 * gaps[0]
    without = CostAware(1, costs(verify_growth=0.1), 8, context=100, remaining=10000, backoff=0)
    assert from_first_probe(probe_gaps(without, 100)) == [8] * 10  # no backoff: every 8 plain rounds

    def gaps_at(rate):  # B=2 only, acceptance `rate` kept by a heavy prior, every draft rejected
        return probe_gaps(CostAware(1, costs(verify_growth=0.1), 2, context=100, remaining=10000, prior=rate,
                                    prior_rounds=1000), 200)

    assert gaps_at(0.05)[1:4] == [16, 32, 64]  # drafting at 0.88x of plain: back to plain, backs off
    assert gaps_at(0.15)[1:10] == [0] * 9  # at 0.96x (within the margin, 5%): drafting is kept after a probe


def test_decoding_times_its_rounds_into_learned_costs_and_stays_lossless(qwen3):
    tok = no_eos(qwen3.tokenizer)
    learned, acceptance = LearnedCosts(costs()), session_acceptance()
    for seed in (1, 2, 3):
        prompt = make_prompt(11 + seed, seed=seed)
        r = generate(qwen3.model, qwen3.draft, tok, prompt, block_size=3, max_tokens=40, refine=True,
                     costs=learned, acceptance=acceptance)
        assert r.tokens == reference(qwen3.model, prompt, max_tokens=40)
    # real rounds of the tiny model take milliseconds, the synthetic calibration says seconds
    assert learned.timed and all(0 < learned.ratio(w, 20) < 0.5 for w in learned.timed)
    assert acceptance.seen and acceptance.seen[0] > 3


def test_a_long_unread_prompt_is_decoded_plain_and_exact(qwen3):
    tok = no_eos(qwen3.tokenizer)
    prompt = make_prompt(37, seed=4)
    ref = reference(qwen3.model, prompt, max_tokens=12)
    right = ScriptedDraft(qwen3.draft.config, prompt + ref, qwen3.cfg["vocab_size"])
    widths, tokens = widths_of(qwen3.model, right, tok, prompt, costs(read_s=10.0), 12)
    assert tokens == ref and set(widths) == {1}  # reading 37 features would cost 370 s
    widths, tokens = widths_of(qwen3.model, right, tok, prompt, costs(read_s=1e-4), 12)
    assert tokens == ref and max(widths) > 1


@pytest.mark.slow
def test_cost_aware_keeps_the_sampling_distribution(small_vocab):  # noqa: F811
    model, draft = small_vocab
    prompt = [1, 4, 2]
    exact = exact_distribution(model, prompt, 1.0, 1.0, 0)
    counts, widths = {}, set()
    # half the runs learn over the "session" (round times, acceptance), as a bundle's generations do
    learned, acceptance = LearnedCosts(costs(draft_s=0.01, verify_growth=0.05)), session_acceptance()
    for seed in range(RUNS):
        session = dict(costs=learned, acceptance=acceptance) if seed % 2 else dict(costs=costs(draft_s=0.01, verify_growth=0.05))
        steps = list(generate_step(model, draft, prompt, GenerationOptions(max_tokens=STEPS, block_size=2, refine=True,
                                                                          temperature=1.0, seed=seed), **session))
        widths.update(s.width for s in steps[1:])
        seq = tuple(t for s in steps for t in s.tokens)
        counts[seq] = counts.get(seq, 0) + 1
    assert len(widths) > 1, "the controller should have moved the width"
    assert_same_distribution(counts, exact)


def test_measure_and_cache(qwen3, tmp_path):
    from mlx_blockpilot.bundle import Bundle

    c = measure(qwen3.model, qwen3.draft, widths=(1, 2, 4), contexts=(16, 64), reps=1)
    assert c.widths == [1, 2, 4] and c.contexts == [16, 64]
    fewer = measure(qwen3.model, qwen3.draft, widths=(1, 2, 3, 4), contexts=(16, 64), reps=1, long_widths=(1, 2, 4))
    assert all(len(row) == 4 for row in fewer.verify_s + fewer.draft_s) and fewer.draft_s[1][0] == 0.0
    assert all(v > 0 for row in c.verify_s for v in row) and all(row[0] == 0 for row in c.draft_s)
    assert len(c.read_s) == 2 and all(r >= 0 for r in c.read_s) and c.catch_up_s(64) >= 0
    assert c.round_s(2, 16) > c.round_s(1, 16)
    assert len(c.sample_s) == 3 and min(c.sample_s) >= 0 and c.sample_s == sorted(c.sample_s)
    bundle = Bundle(qwen3.model, qwen3.tokenizer, qwen3.draft, path=tmp_path)
    first = calibrate(bundle)
    assert (tmp_path / "calibration.json").is_file() and load_costs(bundle) == first
    assert calibrate(bundle) == first  # cached: not measured again
    assert read_costs(tmp_path / "calibration.json") == first
    data = json.loads((tmp_path / "calibration.json").read_text())
    data["key"]["mlx"] = "0.0.0"  # measured with other software: stale
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    assert load_costs(bundle) is None
    data["key"] = dict(first.key, round_code="0" * 16)  # measured with other decoding code: stale
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    assert first.key["round_code"] == round_code() and load_costs(bundle) is None
    from mlx_blockpilot.api import costs_for

    kept = calibrate(bundle, force=True)
    write_costs(replace(kept, corrections={2: 1.3}), tmp_path / "calibration.json")
    learned = costs_for(bundle, refine=True)  # a session keeps what it learns in the bundle's calibration
    assert learned.path == tmp_path / "calibration.json" and learned.ratio(2, 64) == pytest.approx(1.3)


def test_every_drafted_width_is_warmed_up_before_it_is_timed(qwen3):
    """A shape's first pass allocates its buffers: timed cold (one sample) it put the demo's B=2
    round at 1.41-1.46 plain steps where decoding took 1.29. Each drafted width runs its draft pass
    and its round once untimed, then ``reps`` timed times each."""

    class Counting:  # the drafter, counting its passes by block width
        def __init__(self, draft):
            self.draft, self.config, self.passes = draft, draft.config, {}

        def make_cache(self):
            return self.draft.make_cache()

        def draft_ids(self):
            return self.draft.draft_ids()

        def propose(self, model, block, context_hidden, cache):
            self.passes[block.shape[1]] = self.passes.get(block.shape[1], 0) + 1
            return self.draft.propose(model, block, context_hidden, cache)

    for reps in (1, 3):
        counting = Counting(qwen3.draft)
        measure(qwen3.model, counting, widths=(1, 2, 4), contexts=(16,), reps=reps)
        assert counting.passes[4] == 2 * (1 + reps)  # (warm-up + timed) x (draft pass alone, whole round)


def test_the_round_code_fingerprint_follows_the_rounds_source(tmp_path, monkeypatch):
    """An edit of a module a round runs (here: sampling) changes the fingerprint, so cached
    costs measured with the old code are measured again."""
    from mlx_blockpilot import sampling

    before = round_code()
    edited = tmp_path / "sampling.py"
    edited.write_bytes(Path(sampling.__file__).read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(sampling, "__file__", str(edited))
    assert round_code() != before
    monkeypatch.undo()
    assert round_code() == before


def test_calibrate_command(qwen3, tmp_path, monkeypatch, capsys):
    from mlx_blockpilot.cli.calibrate import main as calibrate_main

    monkeypatch.setenv("MLX_BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    argv = ["--target", str(qwen3.target_dir), "--draft", str(qwen3.draft_dir)]
    assert calibrate_main(argv) == 0
    out, err = capsys.readouterr()
    assert "| context | B=1 | B=2 | B=3 | B=4 | B=8 |" in out and "calibrating" in err and "measured now" in err
    [path] = (tmp_path / "cache" / "calibration").glob("*.json")
    write_costs(replace(read_costs(path), corrections={1: 0.9, 4: 1.25}), path)
    assert calibrate_main(argv) == 0
    out, err = capsys.readouterr()
    lengths = ", ".join(map(str, read_costs(path).contexts))  # flat corrections (older files): at every context
    assert f"against a plain step they cost x1.39 at B=4 after {lengths} tokens of what" in out and "cached; --force measures again" in err
    assert calibrate_main(argv + ["--force", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["corrections"] == {} and read_costs(path).corrections == {}  # measured again: forgotten
    assert "measured now" in err
