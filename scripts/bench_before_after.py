"""Decode speed of this checkout's engine against an earlier commit's, side by side in one process.

The earlier commit's package is extracted with ``git archive`` under another name
(``mlx_blockpilot_before``: its imports are relative, so it runs as it was) and
decodes with its own drafter, policy and loop; the rows are interleaved per prompt
with mlx-lm and the official backend, as ``bench`` does:

    scripts/with-openblas python scripts/bench_before_after.py --before bfa068f \\
        --prompts heldout.jsonl --limit 10 --max-tokens 128 --block-size 3 --out docs/benchmarks/before-after
"""

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm import tqdm

from mlx_blockpilot.bench.official import load_official
from mlx_blockpilot.bench.runner import run_mlx_lm, run_official, run_ours, timed
from mlx_blockpilot.cli.common import load_from_args
from mlx_blockpilot.prompts import encode_prompt, load_prompts

ROOT = Path(__file__).resolve().parents[1]


def extract(commit: str, into: Path) -> None:
    """The package as it was at ``commit``, importable as ``mlx_blockpilot_before``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "mlx_blockpilot"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    (into / "mlx_blockpilot").rename(into / "mlx_blockpilot_before")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the earlier commit")
    p.add_argument("--model", help="bundle (default: the offline demo)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.target = args.draft = args.policy = None

    bundle = load_from_args(args)
    texts = load_prompts(args.prompts, limit=args.limit)
    prompts = [encode_prompt(bundle.tokenizer, t) for t in texts]
    root = Path(args.model)
    official = load_official(root / "target", root / "draft")

    tmp = Path(tempfile.mkdtemp())
    extract(args.before, tmp)
    sys.path.insert(0, str(tmp))
    from mlx_blockpilot_before import decode as old_decode
    from mlx_blockpilot_before.draft import load_draft as old_load_draft
    from mlx_blockpilot_before.policy import load_policy as old_load_policy

    old_draft = old_load_draft(root / "draft")
    old_policy = old_load_policy(root / "policy") if (root / "policy").is_dir() else None
    model, tok, b = bundle.model, bundle.tokenizer, args.block_size
    opts = dict(max_tokens=args.max_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None)

    def old_run(block_size, policy=None):
        def go(prompt):
            stream = old_decode.stream_generate(model, old_draft, tok, prompt, block_size=block_size, policy=policy,
                                                max_tokens=args.max_tokens)
            tokens, _, tps, r = timed(stream, lambda r: r.tokens)
            return dict(tokens=tokens, decode_tokens_per_s=tps, mean_acceptance=r.mean_acceptance)
        return go

    configs = {
        "mlx-lm": lambda pr: run_mlx_lm(model, tok, pr, opts),
        f"before B={b}": old_run(b),
        f"after B={b}": lambda pr: run_ours(model, bundle.draft, tok, pr, opts, b),
    }
    if official is not None:
        configs[f"dflash B={b}"] = lambda pr: run_official(official, tok, pr, opts, b)
    if bundle.policy is not None:
        configs["before auto"] = old_run("auto", old_policy)
        configs["after auto"] = lambda pr: run_ours(model, bundle.draft, tok, pr, opts, "auto", policy=bundle.policy)

    warm = dict(opts, max_tokens=8)
    for name, fn in configs.items():  # warm-up, untimed
        fn(prompts[0]) if name != "mlx-lm" else run_mlx_lm(model, tok, prompts[0], warm)

    runs = []
    bar = tqdm(total=args.repeats * len(prompts) * len(configs), desc="before/after")
    for rep in range(args.repeats):
        for i, pr in enumerate(prompts):
            row = {}
            for name, fn in configs.items():
                row[name] = fn(pr)
                bar.update()
            ref = row["mlx-lm"]["tokens"]
            for name, r in row.items():
                runs.append({"config": name, "prompt": i, "repeat": rep, "tokens_per_s": r["decode_tokens_per_s"],
                             "mean_acceptance": r.get("mean_acceptance"), "same_tokens_as_mlx_lm": r["tokens"] == ref})
    bar.close()

    lines = ["| configuration | mean decode tok/s | vs mlx-lm (mean tok/s) | median per-prompt ratio vs after | "
             "mean acceptance | same tokens as mlx-lm |", "|---|---:|---:|---:|---:|---:|"]
    base = statistics.mean(r["tokens_per_s"] for r in runs if r["config"] == "mlx-lm")
    after = {(r["prompt"], r["repeat"]): r["tokens_per_s"] for r in runs if r["config"] == f"after B={b}"}
    for name in configs:
        mine = [r for r in runs if r["config"] == name]
        tps = statistics.mean(r["tokens_per_s"] for r in mine)
        ratio = statistics.median(r["tokens_per_s"] / after[(r["prompt"], r["repeat"])] for r in mine)
        acc = [r["mean_acceptance"] for r in mine if r["mean_acceptance"]]
        same = sum(r["same_tokens_as_mlx_lm"] for r in mine)
        lines.append(f"| {name} | {tps:.2f} | {tps / base:.2f}x | {ratio:.2f} | "
                     f"{statistics.mean(acc) if acc else float('nan'):.2f} | {same}/{len(mine)} |")
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=1))
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
