"""The benchmark tool runs end to end on tiny fixtures and writes its outputs (no timing asserts)."""

import json
from dataclasses import replace

import pytest

from mlx_blockpilot.bench.drafters import true_continuation
from mlx_blockpilot.bench.runner import profile_rounds, run_order
from mlx_blockpilot.cli.bench import main as bench_main
from mlx_blockpilot.costs import read_costs, write_costs

PROMPTS = ["the quick brown fox", "what is the capital of france?"]


@pytest.fixture
def prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def test_cli_writes_results_table_and_plots(qwen3, prompts_txt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    argv = [
        "--target", str(qwen3.target_dir), "--draft", str(qwen3.draft_dir), "--prompts", str(prompts_txt),
        "--max-tokens", "12", "--block-sizes", "1,3", "--dflash-block-sizes", "3", "--repeats", "2",
        "--profile", "3", "--out", str(out),
    ]
    assert bench_main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in res["table"]}
    expected = {"mlx-lm", "ours B=1", "ours B=3", "oracle", "engine B=3"}
    pytest.importorskip("dflash.model_mlx")
    expected.add("dflash B=3")
    assert set(rows) == expected
    # every configuration ran on every prompt in every repeat
    assert len(res["runs"]) == len(expected - {"oracle"}) * len(PROMPTS) * 2
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0 for r in res["runs"])
    # each prompt of each repeat ran every row once, in its own order, the engine row last
    orders = set()
    for p, rep in [(p, rep) for p in range(len(PROMPTS)) for rep in range(2)]:
        turn = sorted((r["position"], r["config"]) for r in res["runs"] if r["prompt"] == p and r["repeat"] == rep)
        assert [pos for pos, _ in turn] == list(range(len(expected) - 1)) and turn[-1][1] == "engine B=3"
        orders.add(tuple(name for _, name in turn))
    assert len(orders) > 1
    # lossless: ours and the engine rows equal mlx-lm, the official backend equals ours
    for name in ("ours B=1", "ours B=3", "engine B=3", "dflash B=3"):
        assert rows[name]["same_tokens"] == f"{len(PROMPTS) * 2}/{len(PROMPTS) * 2}", name
    runs = {(r["config"], r["prompt"], r["repeat"]): r for r in res["runs"]}
    for p in range(len(PROMPTS)):
        assert runs[("ours B=3", p, 0)]["tokens"] == runs[("mlx-lm", p, 0)]["tokens"]
        assert runs[("dflash B=3", p, 1)]["tokens"] == runs[("mlx-lm", p, 1)]["tokens"]
    # the true-continuation drafter is always accepted: 3 tokens per round but the last
    assert rows["engine B=3"]["mean_acceptance"] > 2
    assert rows["ours B=1"]["mean_acceptance"] == 1
    assert rows["mlx-lm"]["speedup"] == pytest.approx(1.0)
    assert rows["engine B=3"]["bound_tokens_per_s"] > 0 and rows["engine B=3"]["efficiency"] > 0
    assert rows["oracle"]["chosen_block_sizes"] and set(rows["oracle"]["chosen_block_sizes"]) <= {1, 3}
    assert set(res["costs"]) == {"1", "3"} and res["costs"]["1"]["draft_s"] == 0
    prof = res["profile"]
    assert prof["block_size"] == 3 and prof["rounds"] > 0
    assert prof["same_tokens_as_mlx_lm"] == f"{len(PROMPTS)}/{len(PROMPTS)}"
    assert prof["draft_s"] > 0 and prof["verify_s"] > 0 and prof["host_s"] >= 0
    assert res["prompts"] == {"prompts": PROMPTS} and res["settings"]["max_tokens"] == 12
    md = (out / "results.md").read_text()
    assert "| configuration |" in md and "| ours B=3 |" in md and "PROFILING MODE" in md
    assert md in capsys.readouterr().out
    for png in ("tokens_per_s.png", "speedup_vs_block_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_take_every_place_and_every_neighbour():
    """Over the turns of a run each row takes every place, and the row after mlx-lm changes
    (a fixed order would give it to the same row every time); rows needing mlx-lm's tokens run last."""
    configs = [("mlx-lm", None), ("ours B=1", 1), ("ours B=2", 2), ("ours auto", "auto"), ("engine B=2", 2)]
    orders = [run_order(configs, turn) for turn in range(48)]
    assert all(sorted(o, key=str) == sorted(configs, key=str) for o in orders)
    assert all(o[-1] == ("engine B=2", 2) for o in orders)
    for name, _ in configs[:-1]:
        assert {[n for n, _ in o].index(name) for o in orders} == {0, 1, 2, 3}, name
    after_mlx_lm = {o[[n for n, _ in o].index("mlx-lm") + 1][0] for o in orders}
    assert {"ours B=1", "ours B=2", "ours auto"} <= after_mlx_lm
    assert orders == [run_order(configs, turn) for turn in range(48)]  # seeded: a rerun runs the same orders


def test_profile_rounds_is_lossless(qwen3):
    from test_decode import make_prompt, no_eos, reference

    prompt = make_prompt(9, seed=5)
    tok = no_eos(qwen3.tokenizer)
    for block in (1, 2, 5):
        out = profile_rounds(qwen3.model, qwen3.draft, tok, prompt, block, 20)
        assert out["tokens"] == reference(qwen3.model, prompt, max_tokens=20)
        assert sum(r["accepted"] for r in out["rounds"]) == 19
        assert all((r["draft_s"] > 0) == (r["width"] > 1) for r in out["rounds"])
        assert out["rounds"][0]["width"] == block


def test_true_continuation_draft_is_fully_accepted(qwen3):
    from test_decode import make_prompt, no_eos, reference

    from mlx_blockpilot.decode import generate

    prompt = make_prompt(7, seed=2)
    ref = reference(qwen3.model, prompt, max_tokens=25)
    oracle = true_continuation(qwen3.draft, prompt + ref, qwen3.cfg["vocab_size"])
    r = generate(qwen3.model, oracle, no_eos(qwen3.tokenizer), prompt, block_size=4, max_tokens=25)
    assert r.tokens == ref
    assert all(a == 4 for a in r.acceptance_lengths[:-1])


def test_target_without_drafter_is_a_clear_error(prompts_txt, tmp_path, capsys):
    assert bench_main(["--target", str(tmp_path), "--prompts", str(prompts_txt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--model BUNDLE" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, match",
    [(["--repeats", "0"], "--repeats"), (["--block-sizes", "0"], "block sizes"), (["--profile", "auto"], "--profile"),
     (["--out", "/proc/1/bench-out"], "cannot write into"), (["--temp", "nan"], "temperature"),
     (["--limit", "0"], "limit must be >= 1"), (["--context-lengths", "2048-4096"], "token counts"),
     (["--prompts", "chat=x.txt", "--prompts", "chat=y.txt"], "categories must differ"),
     (["--recalibrate"], "add --control")],
)
def test_bad_arguments(prompts_txt, tmp_path, capsys, extra, match):
    assert bench_main(["--prompts", str(prompts_txt), "--out", str(tmp_path / "o"), *extra]) == 2
    assert match in capsys.readouterr().err


def test_policy_row_and_sampling(qwen3, prompts_txt, tmp_path):
    import mlx.core as mx

    from mlx_blockpilot.policy import BlockPolicy, PolicyConfig, save_policy

    policy = BlockPolicy(PolicyConfig("logits", qwen3.cfg["vocab_size"], hidden_size=8, num_layers=1, block_sizes=[2, 3]))
    mx.eval(policy.parameters())
    save_policy(policy, tmp_path / "policy")
    out = tmp_path / "out"
    argv = [
        "--target", str(qwen3.target_dir), "--draft", str(qwen3.draft_dir), "--policy", str(tmp_path / "policy"),
        "--prompts", str(prompts_txt), "--max-tokens", "8", "--block-sizes", "2", "--dflash-block-sizes", "none",
        "--repeats", "1", "--temp", "0.8", "--seed", "3", "--out", str(out),
    ]
    assert bench_main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in res["table"]}
    # no token checks and no true-continuation rows when sampling
    assert set(rows) == {"mlx-lm", "ours B=2", "ours auto", "ours auto+refine", "oracle"}
    assert all(r["same_tokens"] is None for r in rows.values())
    assert len(rows["ours auto"]["chosen_block_sizes"]) == len(PROMPTS)
    assert set(rows["ours auto"]["chosen_block_sizes"]) <= {2, 3}
    assert rows["ours auto"]["policy_ms"] > 0 and 0 < rows["ours auto"]["policy_share_of_prefill"]
    assert "of prefill" in (out / "results.md").read_text()
    assert res["profile"] is None and res["costs"] == {}


def test_an_unusable_out_fails_before_the_benchmark_runs(qwen3, prompts_txt, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    argv = ["--target", str(qwen3.target_dir), "--draft", str(qwen3.draft_dir), "--prompts", str(prompts_txt),
            "--out", str(tmp_path / "file"), "--repeats", "1", "--max-tokens", "4"]
    assert bench_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a directory" in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "not a directory"


def test_categories_long_contexts_and_the_controller(qwen3, prompts_txt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLX_BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = prompts_txt.with_name("code.txt")
    code.write_text("def add(a, b):\nreturn the sum\n")
    argv = ["--target", str(qwen3.target_dir), "--draft", str(qwen3.draft_dir), "--prompts", f"chat={prompts_txt}",
            "--prompts", f"code={code}", "--context-lengths", "120", "--control", "--max-tokens", "6",
            "--block-sizes", "1,3", "--dflash-block-sizes", "none", "--no-engine", "--repeats", "1", "--out", str(out)]
    assert bench_main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["categories"] == ["chat", "chat", "code", "code", "120 tokens"]
    cats = res["by_category"]
    assert list(cats) == ["chat", "code", "120 tokens"] and 60 < cats["120 tokens"]["mean_prompt_tokens"] <= 120
    for c in cats.values():
        assert c["rows"]["mlx-lm"]["speedup"] == pytest.approx(1.0)
        assert {"ours B=1", "ours B=3", "ours control", "oracle"} <= set(c["rows"])
    rows = {r["config"]: r for r in res["table"]}
    assert rows["ours control"]["same_tokens"] == "5/5"
    # which widths the controller ran: every round counted once, shares of all rounds
    control = [r for r in res["runs"] if r["config"] == "ours control"]
    counted = {}
    for r in control:
        assert sum(r["widths"].values()) == r["rounds"]
        for w, n in r["widths"].items():
            counted[w] = counted.get(w, 0) + n
    shares = rows["ours control"]["rounds_by_width"]
    assert shares == pytest.approx({w: n / sum(counted.values()) for w, n in counted.items()})
    fixed = [r["widths"] for r in res["runs"] if r["config"] == "ours B=3"]  # narrower only where max_tokens cuts
    assert all(max(map(int, w)) == 3 and w["3"] >= 3 for w in fixed)
    assert "rounds at B=" in (out / "results.md").read_text()
    assert len(list((tmp_path / "cache" / "calibration").glob("*.json"))) == 1  # no bundle folder: the user cache
    assert "calibrating" in capsys.readouterr().err
    assert (out / "speedup_vs_context.png").read_bytes()[:4] == b"\x89PNG"
    assert "by prompt category" in (out / "results.md").read_text()
    check = res["calibration"]
    assert set(check) == {"1", "3"} and all(c["runs"] == 5 and c["median_predicted_over_measured"] > 0 for c in check.values())
    assert check["1"]["relative_to_plain"] is None and check["3"]["relative_to_plain"] > 0
    assert "relative to plain" in (out / "results.md").read_text()
    assert all(c["learned_over_measured"] > 0 for c in check.values())  # the controller's costs after the run
    assert "after the run's timed rounds" in (out / "results.md").read_text()
    # --rows: a subset of the rows (mlx-lm always), and a clear error for a row this run does not have;
    # the cached calibration, with the corrections earlier sessions kept in it
    cached = next((tmp_path / "cache" / "calibration").glob("*.json"))
    write_costs(replace(read_costs(cached), corrections={1: 1.5, 3: 3.0}), cached)
    assert bench_main(argv + ["--rows", "ours B=1,ours B=3,ours control", "--out", str(tmp_path / "some")]) == 0
    some = json.loads((tmp_path / "some" / "results.json").read_text())
    assert {r["config"] for r in some["table"]} == {"mlx-lm", "ours B=1", "ours B=3", "ours control", "oracle"}
    assert "calibrating" not in capsys.readouterr().err  # the cached calibration
    check = some["calibration"]  # what the controller started from: the calibration x 1.5 at B=1, x 3 at B=3
    for b, factor in (("1", 1.5), ("3", 3.0)):
        assert check[b]["corrected_over_measured"] == pytest.approx(factor * check[b]["median_predicted_over_measured"])
    assert check["3"]["corrected_relative_to_plain"] == pytest.approx(2 * check["3"]["relative_to_plain"])
    assert bench_main(argv + ["--rows", "ours B=3,ours control", "--recalibrate", "--out", str(tmp_path / "fresh")]) == 0
    assert "calibrating" in capsys.readouterr().err
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())
    assert fresh["calibration"]["3"]["corrected_over_measured"] is None  # measured again: nothing kept yet
    assert bench_main(argv + ["--rows", "ours B=1,ours auto", "--out", str(tmp_path / "none")]) == 2  # no policy
    assert "--rows ours auto: not a row of this benchmark; its rows are mlx-lm, ours B=1" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
