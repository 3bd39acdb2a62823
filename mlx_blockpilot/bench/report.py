"""Benchmark results: per-prompt medians and the table (``summarize``), markdown, PNG plots."""

import json
import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx


def median_of(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mean_of(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(runs: List[Any], costs, profile, n_prompts: int, settings, categories: Optional[List[str]] = None,
              prompt_lengths: Optional[List[int]] = None) -> Dict[str, Any]:
    """Per-prompt medians over repeats, rows (mean over prompts), oracle row, engine bounds,
    and per prompt category the speed against mlx-lm on the same prompts."""
    names = list(dict.fromkeys(r.config for r in runs))
    per_prompt: Dict[str, List[Dict[str, Any]]] = {}
    for name in names:
        rows = []
        for p in range(n_prompts):
            rs = [r for r in runs if r.config == name and r.prompt == p]
            rows.append({
                "prompt": p,
                "decode_tokens_per_s": median_of([r.decode_tokens_per_s for r in rs]),
                "prefill_s": median_of([r.prefill_s for r in rs]),
                "mean_acceptance": median_of([r.mean_acceptance for r in rs]),
                "generation_tokens": median_of([len(r.tokens) for r in rs]),
                "block_size": rs[0].block_size if rs else None,
            })
        per_prompt[name] = rows
    fixed = [n for n in names if n.startswith("ours B=")]
    if fixed:
        best = []
        for p in range(n_prompts):
            name = max(fixed, key=lambda n: per_prompt[n][p]["decode_tokens_per_s"] or 0.0)
            best.append(dict(per_prompt[name][p]))
        per_prompt["oracle"] = best
        names.insert(names.index(fixed[-1]) + 1 + sum(n.startswith("ours auto") for n in names), "oracle")

    base = mean_of([x["decode_tokens_per_s"] for x in per_prompt["mlx-lm"]])
    table = []
    for name in names:
        pp = per_prompt[name]
        tps = mean_of([x["decode_tokens_per_s"] for x in pp])
        checks = [r.check for r in runs if r.config == name and r.check is not None]
        row = {
            "config": name,
            "block_size": pp[0]["block_size"] if name.startswith(("ours B", "dflash", "engine")) else None,
            "decode_tokens_per_s": tps,
            "speedup": tps / base if base and tps else None,
            "prefill_s": mean_of([x["prefill_s"] for x in pp]),
            "mean_acceptance": mean_of([x["mean_acceptance"] for x in pp]),
            "same_tokens": f"{sum(checks)}/{len(checks)}" if checks else None,
        }
        if name == "oracle":
            row["chosen_block_sizes"] = [x["block_size"] for x in pp]
        if name.startswith(("ours auto", "ours control")):
            row["rounds_by_width"] = rounds_by_width([r for r in runs if r.config == name])
        if name.startswith("ours auto"):
            row["chosen_block_sizes"] = [x["block_size"] for x in pp]
            mine = [r for r in runs if r.config == name]
            row["policy_ms"] = 1e3 * median_of([r.policy_s for r in mine])
            row["policy_share_of_prefill"] = median_of([r.policy_share for r in mine])
        if name.startswith("engine") and row["block_size"] in costs:
            c = costs[row["block_size"]]
            row["bound_tokens_per_s"] = row["mean_acceptance"] / (c["draft_s"] + c["verify_s"])
            row["efficiency"] = tps / row["bound_tokens_per_s"]
        table.append(row)
    return {
        "settings": settings,
        "table": table,
        "by_category": by_category(per_prompt, names, categories, prompt_lengths) if categories else None,
        "per_prompt": per_prompt,
        "costs": {str(k): v for k, v in costs.items()},
        "profile": profile,
        "runs": [asdict(r) for r in runs],
    }


def rounds_by_width(runs: List[Any]) -> Dict[int, float]:
    """The share of all rounds of ``runs`` run at each block size (the per-round controller
    picks each round's width; a fixed size runs one)."""
    counts: Dict[int, int] = {}
    for r in runs:
        for w, n in (r.widths or {}).items():
            counts[int(w)] = counts.get(int(w), 0) + n
    total = sum(counts.values())
    return {w: counts[w] / total for w in sorted(counts)} if total else {}


def by_category(per_prompt, names, categories, prompt_lengths) -> Dict[str, Any]:
    """For every category and configuration: mean tok/s, the ratio to mlx-lm's mean on the same
    prompts and the worst single prompt's ratio."""
    out = {}
    for cat in dict.fromkeys(categories):
        idx = [i for i, c in enumerate(categories) if c == cat]
        base = [per_prompt["mlx-lm"][i]["decode_tokens_per_s"] for i in idx]
        rows = {}
        for name in names:
            tps = [per_prompt[name][i]["decode_tokens_per_s"] for i in idx]
            if any(t is None for t in tps):
                continue
            ratios = [t / b for t, b in zip(tps, base) if b]
            rows[name] = {"decode_tokens_per_s": mean_of(tps),
                          "speedup": mean_of(tps) / mean_of(base) if mean_of(base) else None,
                          "worst_prompt_ratio": min(ratios, default=None)}
        out[cat] = {"prompts": len(idx), "mean_prompt_tokens": mean_of([prompt_lengths[i] for i in idx]), "rows": rows}
    return out


# ----------------------------------------------------------------------------- outputs


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def markdown(results: Dict[str, Any]) -> str:
    lines = [
        "| configuration | decode tok/s | speedup vs mlx-lm | prefill s | mean acceptance | same tokens | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["table"]:
        notes = []
        if "chosen_block_sizes" in r:
            notes.append("sizes " + ",".join(str(b) for b in r["chosen_block_sizes"]))
        if r.get("rounds_by_width"):
            notes.append("rounds at B=" + ", ".join(f"{w}: {s:.0%}" for w, s in r["rounds_by_width"].items()))
        if "policy_ms" in r:
            notes.append(f"policy {r['policy_ms']:.2f} ms = {r['policy_share_of_prefill']:.2%} of prefill")
        if "bound_tokens_per_s" in r:
            notes.append(f"bound {r['bound_tokens_per_s']:.1f} tok/s, efficiency {r['efficiency']:.0%}")
        lines.append(
            f"| {r['config']} | {_fmt(r['decode_tokens_per_s'], '.1f')} | {_fmt(r['speedup'], '.2f')}x | "
            f"{_fmt(r['prefill_s'], '.3f')} | {_fmt(r['mean_acceptance'], '.2f')} | {r['same_tokens'] or ''} | {'; '.join(notes)} |"
        )
    cats = results.get("by_category")
    if cats:
        names = list(next(iter(cats.values()))["rows"])
        lines += ["", "Speed against mlx-lm by prompt category (mean tok/s ratio on the same prompts; worst single prompt):", "",
                  "| configuration | " + " | ".join(f"{c} ({v['prompts']} prompts, ~{v['mean_prompt_tokens']:.0f} tok)"
                                                     for c, v in cats.items()) + " |",
                  "|---|" + "---:|" * len(cats)]
        for name in names:
            cells = []
            for c in cats.values():
                r = c["rows"].get(name)
                cells.append(f"{_fmt(r['speedup'], '.2f')}x (worst {_fmt(r['worst_prompt_ratio'], '.2f')})"
                             if r and r["speedup"] is not None else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results.get("calibration"):
        lines += ["", "Calibrated round cost against the measured one (fixed-size runs; 1.00 = exact; relative to "
                  "plain: both as ratios to B=1 on the same prompt, free of the machine's drift):", "",
                  "| B | median predicted / measured | range | relative to plain | with the kept corrections "
                  "| with them, relative to plain | after the run's timed rounds | runs |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|"]
        for b, c in results["calibration"].items():
            lines.append(f"| {b} | {c['median_predicted_over_measured']:.2f} | {c['min']:.2f}-{c['max']:.2f} | "
                         f"{_fmt(c.get('relative_to_plain'), '.2f')} | {_fmt(c.get('corrected_over_measured'), '.2f')} | "
                         f"{_fmt(c.get('corrected_relative_to_plain'), '.2f')} | "
                         f"{_fmt(c.get('learned_over_measured'), '.2f')} | "
                         f"{c['runs']} |")
    if results.get("costs"):
        lines += ["", "Isolated costs (each evaluated alone, median):", "",
                  "| B | target forward at width B, ms | draft pass at B, ms |", "|---:|---:|---:|"]
        for b, c in results["costs"].items():
            lines.append(f"| {b} | {c['verify_s'] * 1e3:.1f} | {c['draft_s'] * 1e3:.1f} |")
    prof = results.get("profile")
    if prof:
        total = prof["draft_s"] + prof["verify_s"] + prof["host_s"]
        lines += ["", f"Per-round time split at B={prof['block_size']} (PROFILING MODE: a sync after the draft and after "
                  f"the verify pass; medians over {prof['rounds']} rounds, same tokens as mlx-lm {prof['same_tokens_as_mlx_lm']}):", "",
                  "| draft pass ms | verify pass ms | host/accept ms | round ms (profiled) | round ms (timed runs, no extra syncs) |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {prof['draft_s'] * 1e3:.1f} ({prof['draft_s'] / total:.0%}) | {prof['verify_s'] * 1e3:.1f} "
                  f"({prof['verify_s'] / total:.0%}) | {prof['host_s'] * 1e3:.1f} ({prof['host_s'] / total:.0%}) | "
                  f"{total * 1e3:.1f} | {_fmt((prof.get('round_s_unprofiled') or 0) * 1e3, '.1f')} |"]
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, Any], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["table"]
    names = [r["config"] for r in table]
    colors = ["tab:gray" if n == "mlx-lm" else "tab:red" if n.startswith("dflash") else
              "tab:green" if n.startswith("engine") else "tab:blue" for n in names]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.8 * len(names)), 7), sharex=True)
    a1.bar(names, [r["decode_tokens_per_s"] or 0 for r in table], color=colors)
    a1.set_ylabel("decode tokens/s")
    a1.set_title("Decode speed and mean acceptance per configuration (mean over prompts)")
    a2.bar(names, [r["mean_acceptance"] or 0 for r in table], color=colors)
    a2.set_ylabel("mean acceptance (tokens/round)")
    a2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    p1 = out / "tokens_per_s.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, color, label in (("ours B=", "tab:blue", "ours"), ("dflash B=", "tab:red", "dflash.model_mlx"),
                                 ("engine B=", "tab:green", "ours, true-continuation drafter")):
        pts = sorted((r["block_size"], r["speedup"]) for r in table if r["config"].startswith(prefix) and r["speedup"])
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=label)
    bounds = sorted((r["block_size"], r["bound_tokens_per_s"] / (r["decode_tokens_per_s"] / r["speedup"]))
                    for r in table if "bound_tokens_per_s" in r and r["speedup"])
    if bounds:
        ax.plot(*zip(*bounds), "--", color="tab:green", alpha=0.6, label="bound from isolated costs")
    ax.axhline(1.0, color="tab:gray", lw=1, label="mlx-lm")
    ax.set_xlabel("block size B")
    ax.set_ylabel("decode speedup vs mlx-lm")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = out / "speedup_vs_block_size.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    paths = [p1, p2]
    cats = results.get("by_category")
    if cats and len(cats) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in next(iter(cats.values()))["rows"]:
            if name == "mlx-lm" or name.startswith("engine"):
                continue
            pts = [(v["mean_prompt_tokens"], v["rows"][name]["speedup"]) for v in cats.values()
                   if name in v["rows"] and v["rows"][name]["speedup"] is not None]
            if not pts:
                continue
            ax.plot(*zip(*sorted(pts)), "o-", label=name)
        ax.axhline(1.0, color="tab:gray", lw=1, label="mlx-lm")
        ax.set_xscale("log")
        ax.set_xlabel("prompt length (tokens, mean of the category)")
        ax.set_ylabel("decode speedup vs mlx-lm")
        ax.set_title("Speed against mlx-lm by context length")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p3 = out / "speedup_vs_context.png"
        fig.savefig(p3, dpi=110)
        plt.close(fig)
        paths.append(p3)
    return paths


def machine() -> Dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "mlx": getattr(mx, "__version__", "?"),
        "device": str(mx.default_device()),
        "openblas_preloaded": "openblas" in os.environ.get("LD_PRELOAD", ""),
    }


def write_outputs(results: Dict[str, Any], out: Path) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *plot(results, out)]
