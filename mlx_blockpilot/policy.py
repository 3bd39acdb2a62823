"""BlockPilot: a small MLP that picks the DFlash block size once per prompt.

The policy reads one feature vector per prompt (officially the target's prefill
logits at the last prompt token, the full vocabulary) and scores a few candidate
block sizes. Parameter names follow the official PyTorch predictor
(``layers.0``, ``layers.1``, ..., ``fc_out``) so its weights load unchanged.

Forward pass (dropout is off at inference)::

    x = relu(layers[0](x))
    x = x + relu(layers[i](x))      for i >= 1
    logits = fc_out(x)

Class ``k`` means block size ``block_sizes[k]`` (officially ``14 + k``).
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .dtypes import check_quantization, is_int
from .errors import BlockPilotError

ARCHITECTURE = "blockpilot_mlp"
INPUT_KINDS = ("logits", "hidden")
OFFICIAL_BLOCK_SIZES = [14, 15, 16, 17, 18]
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class PolicyConfig:
    """Shape and meaning of a BlockPilot policy (saved as ``config.json``)."""

    input_kind: str
    input_size: int
    hidden_size: int = 2048
    num_layers: int = 2
    block_sizes: List[int] = field(default_factory=lambda: list(OFFICIAL_BLOCK_SIZES))
    architecture: str = ARCHITECTURE
    # {"bits": 4 | 8, "group_size": 32 | 64 | 128} when layers.0 is quantized.
    quantization: Optional[Dict[str, int]] = None

    def __post_init__(self):
        if not isinstance(self.block_sizes, (list, tuple)):
            raise BlockPilotError(
                f"policy block_sizes must be a list of integers, got {self.block_sizes!r}"
            )
        self.block_sizes = list(self.block_sizes)
        self.validate()

    @property
    def num_classes(self) -> int:
        return len(self.block_sizes)

    def validate(self) -> None:
        if self.architecture != ARCHITECTURE:
            raise BlockPilotError(
                f"policy architecture {self.architecture!r} is not supported; "
                f"only {ARCHITECTURE!r} policies can be loaded"
            )
        if self.input_kind not in INPUT_KINDS:
            raise BlockPilotError(
                f"policy input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}"
            )
        for name in ("input_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise BlockPilotError(
                    f"policy {name} must be a positive integer, got {value!r}"
                )
        if not self.block_sizes:
            raise BlockPilotError("policy block_sizes is empty; give at least one block size")
        bad = [b for b in self.block_sizes if not is_int(b) or b < 1]
        if bad:
            raise BlockPilotError(
                f"policy block_sizes must be integers >= 1, got {self.block_sizes!r}"
            )
        if self.quantization is not None:
            q = self.quantization
            if not isinstance(q, dict) or set(q) != {"bits", "group_size"}:
                raise BlockPilotError(
                    f"policy quantization must be {{'bits': ..., 'group_size': ...}}, got {q!r}"
                )
            check_quantization(q["bits"], q["group_size"], "policy", self.input_size)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PolicyConfig":
        if not isinstance(d, dict):
            raise BlockPilotError(f"policy config must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("input_kind", "input_size") if k not in d]
        if missing:
            raise BlockPilotError(
                f"policy config is missing {', '.join(missing)}; re-convert the policy"
            )
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if d["quantization"] is None:
            del d["quantization"]
        return d


class BlockPolicy(nn.Module):
    """The BlockPilot MLP: features ``(..., input_size)`` -> class logits ``(..., C)``."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        sizes = [config.input_size] + [config.hidden_size] * config.num_layers
        self.layers = [nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:])]
        self.fc_out = nn.Linear(config.hidden_size, config.num_classes)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (``fc_out`` is never quantized)."""
        return self.fc_out.weight.dtype

    def __call__(self, x: mx.array) -> mx.array:
        x = self._features(x)
        for i, layer in enumerate(self.layers):
            h = nn.relu(_linear(layer, x) if i == 0 else layer(x))
            x = h if i == 0 else x + h
        return self.fc_out(x)

    def _features(self, x: Any) -> mx.array:
        if not isinstance(x, mx.array):
            x = mx.array(np.asarray(x, dtype=np.float32))
        n = self.config.input_size
        if x.ndim == 0 or x.shape[-1] != n:
            got = x.shape[-1] if x.ndim else "a scalar"
            raise BlockPilotError(
                f"policy expects {n} input features, got {got}: pass the target's "
                f"{self.config.input_kind} at the last prompt position (shape ({n},)) "
                f"or convert a policy trained for this target"
            )
        return x.astype(self.dtype)


def _linear(layer: nn.Module, x: mx.array) -> mx.array:
    """``layer(x)``; one feature vector goes through ``W @ x``: on MLX's CPU backend
    ``x @ W.T`` with a single row and a narrow layer is up to 100x slower (measured:
    0.9 ms against 180 ms for 49152 -> 64)."""
    if type(layer) is not nn.Linear or x.ndim != 1:
        return layer(x)
    y = layer.weight @ x
    return y + layer.bias if "bias" in layer else y


def choose_block_size(policy: BlockPolicy, features: Any) -> int:
    """The block size the policy picks for one prompt's feature vector.

    ``features`` is ``(V,)``, ``(1, V)`` or ``(1, 1, V)`` (e.g. ``logits[:, -1]``).
    """
    x = policy._features(features)
    if x.size != policy.config.input_size:
        raise BlockPilotError(
            f"choose_block_size takes one feature vector, got shape {tuple(x.shape)}; "
            f"pass the features of a single prompt"
        )
    k = mx.argmax(policy(x.reshape(-1)).reshape(-1)).item()
    return policy.config.block_sizes[k]


def quantize_policy(policy: BlockPolicy, bits: int = 8, group_size: int = 64) -> BlockPolicy:
    """Quantize the (large) first layer in place; the others stay in full precision."""
    if policy.config.quantization is not None:
        raise BlockPilotError("policy is already quantized; quantize a full-precision policy")
    check_quantization(bits, group_size, "policy", policy.config.input_size)
    _quantize_first_layer(policy, bits, group_size)
    policy.config.quantization = {"bits": bits, "group_size": group_size}
    return policy


def _quantize_first_layer(policy: BlockPolicy, bits: int, group_size: int) -> None:
    nn.quantize(
        policy,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda path, module: path == "layers.0",
    )


def save_policy(policy: BlockPolicy, directory: Union[str, Path]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(policy.parameters()))
    mx.save_safetensors(str(directory / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump(policy.config.to_dict(), f, indent=2)
        f.write("\n")


def load_policy(directory: Union[str, Path]) -> BlockPolicy:
    """Load a policy written by :func:`save_policy` (or the converter)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise BlockPilotError(
                f"{path} not found; point to a directory made by the BlockPilot converter"
            )
    try:
        with open(config_path) as f:
            config = PolicyConfig.from_dict(json.load(f))
    except json.JSONDecodeError as e:
        raise BlockPilotError(f"{config_path} is not valid JSON ({e}); re-convert the policy")

    policy = BlockPolicy(config)
    if config.quantization is not None:
        _quantize_first_layer(policy, **config.quantization)
    try:
        policy.load_weights(str(weights_path), strict=True)
    except (ValueError, RuntimeError) as e:
        raise BlockPilotError(
            f"{weights_path} does not match {config_path} ({e}); re-convert the policy"
        )
    mx.eval(policy.parameters())
    policy.eval()
    return policy
