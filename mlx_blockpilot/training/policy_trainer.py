"""Learn a BlockPilot policy from a sweep (``python -m mlx_blockpilot.train_policy``).

Each prompt is labelled with its best block size in the sweep: the highest mean
acceptance length (``--objective acceptance``, as the paper) or the highest
measured decode tokens/s (``--objective throughput``). The MLP (official shape
by default) is trained in MLX with cross-entropy on the training prompts and
evaluated on held-out prompts against every fixed size and the per-prompt
oracle. Writes a policy directory in the bundle format (``config.json`` +
``model.safetensors`` with the official key names) plus ``report.json`` and
``report.png``.

Inputs are centred per feature and scaled by one global factor while training;
both are folded into the first layer afterwards, so the saved policy reads the
raw features exactly as the engine hands them over.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..bundle import TargetFacts, check_policy
from ..errors import BlockPilotError
from ..policy import BlockPolicy, PolicyConfig
from .sweep_file import load_features, read_sweep

OBJECTIVES = {"acceptance": "mean_acceptance", "throughput": "decode_tokens_per_s"}


@dataclass
class SweepData:
    """One row per prompt: features and the measured value of every candidate size."""

    ids: List[str]
    block_sizes: List[int]
    features: np.ndarray  # (N, F) float32
    acceptance: np.ndarray  # (N, S) mean acceptance length
    throughput: np.ndarray  # (N, S) decode tokens/s
    meta: Dict[str, Any]
    predicted: bool = False  # throughput predicted from calibrated costs, not the sweep's timing

    def labels(self, objective: str) -> np.ndarray:
        values = self.acceptance if objective == "acceptance" else self.throughput
        return values.argmax(1)  # ties go to the smaller (cheaper) size


def read_data(path, input_kind: str = "logits", block_sizes: Optional[Sequence[int]] = None, costs=None) -> SweepData:
    """Everything a policy trains on, checked for completeness.

    With ``costs`` (``costs.Costs`` of this machine) the throughput of a (prompt, size)
    is predicted as mean acceptance / the calibrated round cost at that size and the
    prompt's context (half-way through the answer) instead of the sweep's timed tokens/s,
    which carry the machine's noise of the moment."""
    meta, prompts, runs = read_sweep(path)
    if meta is None or not prompts:
        raise BlockPilotError(f"sweep file {path} has no prompts; run python -m mlx_blockpilot.sweep first")
    if input_kind not in meta.get("features", []):
        raise BlockPilotError(
            f"sweep file {path} has no {input_kind} features; re-run the sweep with --features logits,{input_kind}"
        )
    orphans = {pid for pid, _ in runs} - set(prompts)
    if orphans:
        raise BlockPilotError(
            f"sweep file {path} has runs for {len(orphans)} prompts without features (e.g. {sorted(orphans)[0]}); "
            "re-run the sweep to complete it"
        )
    present = sorted({b for _, b in runs})
    sizes = sorted(set(block_sizes)) if block_sizes else present
    if len(sizes) < 2:
        raise BlockPilotError(f"a policy needs at least two candidate block sizes; the sweep has {present}")
    missing = [(pid, b) for pid in prompts for b in sizes if (pid, b) not in runs]
    if missing:
        bad = sorted({b for _, b in missing})
        raise BlockPilotError(
            f"sweep file {path} is missing block size(s) {bad} for {len({p for p, _ in missing})} of "
            f"{len(prompts)} prompts; finish the sweep (run it again to resume) or pick sizes with --block-sizes"
        )
    def throughput(run, prompt, b):
        if costs is None:
            return run["decode_tokens_per_s"]
        context = prompt.get("prompt_tokens", 0) + meta.get("max_tokens", 0) // 2
        return run["mean_acceptance"] / costs.round_s(b, context)

    want = meta["vocab_size"] if input_kind == "logits" else meta["hidden_size"]
    ids = list(prompts)
    rows = []
    for pid in ids:
        x = load_features(path, prompts[pid]).get(input_kind)
        if x is None or x.shape != (want,):
            got = "none" if x is None else tuple(x.shape)
            raise BlockPilotError(
                f"{input_kind} features of prompt {pid} have shape {got}, expected ({want},); the sweep is corrupt"
            )
        rows.append(x)
    return SweepData(
        ids=ids,
        block_sizes=sizes,
        features=np.stack(rows).astype(np.float32),
        acceptance=np.array([[runs[(p, b)]["mean_acceptance"] for b in sizes] for p in ids], np.float64),
        throughput=np.array([[throughput(runs[(p, b)], prompts[p], b) for b in sizes] for p in ids], np.float64),
        meta=meta,
        predicted=costs is not None,
    )


def check_target(data: SweepData, input_kind: str, target_dir) -> None:
    """Raise unless a policy on these features fits the target in ``target_dir``."""
    path = Path(target_dir) / "config.json"
    if not path.is_file():
        raise BlockPilotError(f"no config.json in target directory {target_dir}")
    facts = TargetFacts.from_config(json.loads(path.read_text()))
    check_policy(facts, PolicyConfig(input_kind, data.features.shape[1], block_sizes=data.block_sizes))


def split(n: int, holdout: float, seed: int):
    """(train indices, held-out indices) of ``n`` prompts, shuffled with ``seed``."""
    if not 0 <= holdout < 1:
        raise BlockPilotError(f"--holdout must be in [0, 1), got {holdout}")
    n_test = int(round(n * holdout))
    if holdout > 0 and (n_test < 1 or n - n_test < 2):
        raise BlockPilotError(
            f"the sweep has {n} prompts, too few for a {holdout:g} held-out split "
            f"(need at least 1 held-out and 2 training prompts); sweep more prompts or lower --holdout"
        )
    if holdout == 0 and n < 2:
        raise BlockPilotError(f"the sweep has {n} prompt(s); a policy needs at least 2 to train on")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _forward(policy: BlockPolicy, x: mx.array, dropout: nn.Dropout) -> mx.array:
    """The policy's forward pass with dropout after every ReLU (training only)."""
    for i, layer in enumerate(policy.layers):
        h = dropout(nn.relu(layer(x)))
        x = h if i == 0 else x + h
    return policy.fc_out(x)


def train(
    features: np.ndarray,
    labels: np.ndarray,
    config: PolicyConfig,
    *,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    dropout: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> BlockPolicy:
    """Train a policy on raw ``features`` (N, F) and class ``labels`` (N,)."""
    from tqdm import tqdm

    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0 <= dropout < 1:
        raise BlockPilotError("--epochs and --batch-size must be >= 1, --lr > 0 and --dropout in [0, 1)")
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    mean = features.mean(0)
    scale = float((features - mean).std()) or 1.0
    x_all = mx.array((features - mean) / scale)
    y_all = mx.array(labels.astype(np.int32))
    policy = BlockPolicy(config)
    drop = nn.Dropout(dropout)
    opt = optim.AdamW(learning_rate=lr, weight_decay=weight_decay)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(_forward(model, x, drop), y, reduction="mean")

    step = nn.value_and_grad(policy, loss_fn)
    n = len(labels)
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress)
    for _ in bar:
        order = rng.permutation(n)
        total = 0.0
        for s in range(0, n, batch_size):
            idx = mx.array(order[s : s + batch_size])
            loss, grads = step(policy, x_all[idx], y_all[idx])
            opt.update(policy, grads)
            mx.eval(policy.parameters(), opt.state, loss)
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / n:.4f}")
    # Fold the input normalisation into the first layer: W (x - m) / s + b.
    first = policy.layers[0]
    w = first.weight / scale
    first.weight = w
    first.bias = first.bias - w @ mx.array(mean)
    mx.eval(policy.parameters())
    policy.eval()
    return policy


def predict(policy: BlockPolicy, features: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class picks for raw ``features`` (N, F)."""
    out = [mx.argmax(policy(mx.array(features[i : i + batch])), axis=-1) for i in range(0, len(features), batch)]
    return np.array(mx.concatenate(out)) if out else np.zeros(0, np.int64)


def evaluate(data: SweepData, rows: np.ndarray, picks: np.ndarray, objective: str, train_rows: np.ndarray) -> Dict[str, Any]:
    """Held-out comparison: every fixed size, the best fixed size on training, the policy, the oracles."""
    acc, tps = data.acceptance[rows], data.throughput[rows]
    r = np.arange(len(rows))

    def row(choice):
        return {"mean_acceptance": float(acc[r, choice].mean()), "decode_tokens_per_s": float(tps[r, choice].mean())}

    values = data.acceptance if objective == "acceptance" else data.throughput
    best_fixed = int(values[train_rows].mean(0).argmax())
    labels = data.labels(objective)[rows]
    table = {f"fixed {b}": row(np.full(len(rows), k)) for k, b in enumerate(data.block_sizes)}
    table[f"best fixed on train ({data.block_sizes[best_fixed]})"] = row(np.full(len(rows), best_fixed))
    table["policy"] = row(picks)
    table["oracle (acceptance)"] = row(acc.argmax(1))
    table["oracle (tokens/s)"] = row(tps.argmax(1))
    return {
        "objective": objective,
        "held_out_prompts": len(rows),
        "train_prompts": len(train_rows),
        "top1_accuracy": float((picks == labels).mean()),
        "label_counts": {str(b): int((labels == k).sum()) for k, b in enumerate(data.block_sizes)},
        "policy_picks": {str(b): int((picks == k).sum()) for k, b in enumerate(data.block_sizes)},
        "table": table,
        "tokens_per_s": "predicted from calibrated costs" if data.predicted else "measured in the sweep",
    }


def format_report(report: Dict[str, Any]) -> str:
    lines = [
        f"objective {report['objective']}: {report['train_prompts']} training, "
        f"{report['held_out_prompts']} held-out prompts; top-1 accuracy {report['top1_accuracy']:.3f}",
        f"best sizes (held-out): {report['label_counts']}; policy picks: {report['policy_picks']}",
        f"{'':32s} {'mean AL':>9s} {'tok/s':>9s}   (tok/s {report.get('tokens_per_s', 'measured in the sweep')})",
    ]
    for name, v in report["table"].items():
        lines.append(f"{name:32s} {v['mean_acceptance']:9.3f} {v['decode_tokens_per_s']:9.2f}")
    return "\n".join(lines)


def plot_report(report: Dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["table"])
    colors = [
        "#c3cad2" if n.startswith("fixed") else "#6b7785" if n.startswith("best") else "#4c72b0" if n == "policy" else "#dd8452"
        for n in names
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in zip(axes, ("mean_acceptance", "decode_tokens_per_s"), ("mean acceptance length", f"decode tokens/s ({report.get('tokens_per_s', 'measured in the sweep')})")):
        vals = [report["table"][n][key] for n in names]
        bars = ax.bar(range(len(names)), vals, color=colors)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        lo, hi = min(vals), max(vals)
        ax.set_ylim(max(0.0, lo - (hi - lo) * 0.5 - 1e-3), hi + (hi - lo) * 0.2 + 1e-3)
        ax.set_title(title)
    fig.suptitle(
        f"BlockPilot policy ({report['objective']} labels), {report['held_out_prompts']} held-out prompts, "
        f"top-1 {report['top1_accuracy']:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
