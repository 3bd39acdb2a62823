"""Convert the official BlockPilot predictor checkpoint to an MLX policy directory.

The official weights (``utils/model.pt`` in AMAP-ML/BlockPilot) are a
``torch.save``d bf16 state dict. We read it with torch when it is installed
(``weights_only=True``), and otherwise with a small reader that understands the
torch zip format and accepts nothing but a plain state dict of tensors: any
other pickled object is refused before it could run. ``.safetensors`` files are
read with the ``safetensors`` library (bf16 ones through ``mx.load``).
"""

import collections
import importlib.util
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
import numpy as np
from safetensors import SafetensorError, safe_open

from mlx_blockpilot.dtypes import check_dtype, check_quantization
from mlx_blockpilot.errors import BlockPilotError
from mlx_blockpilot.policy import BlockPolicy, PolicyConfig, quantize_policy, save_policy

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
PathLike = Union[str, Path]


# ---------------------------------------------------------------------------
# Reading state dicts


def read_state_dict(path: PathLike) -> Dict[str, np.ndarray]:
    """Read a torch zip checkpoint or a safetensors file as float32 numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise BlockPilotError(f"{path} not found; give the path of the policy checkpoint")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        if importlib.util.find_spec("torch") is not None:
            return _read_torch_with_torch(path)
        return _read_torch_zip(path)
    raise BlockPilotError(
        f"{path} has an unknown extension; give a .pt, .pth, .bin or .safetensors file"
    )


def _not_plain(path: Path, what: str) -> BlockPilotError:
    return BlockPilotError(
        f"{path} is not a plain state dict of tensors (it references {what}); "
        f"refusing to execute pickled code"
    )


def _corrupt(path: Path, detail: Any) -> BlockPilotError:
    text = str(detail).strip()
    detail = text.splitlines()[0][:120] if text else type(detail).__name__
    return BlockPilotError(
        f"{path} is truncated or corrupt ({detail}); download the checkpoint again"
    )


def _read_torch_with_torch(path: Path) -> Dict[str, np.ndarray]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise _not_plain(path, "objects torch's weights-only loader rejects")
        raise _corrupt(path, e)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _corrupt(path, e)
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise BlockPilotError(
            f"{path} does not hold a flat dict of named tensors; save model.state_dict()"
        )
    return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


# Storage classes as pickled by torch.save, and the little-endian dtype of their bytes
# (bf16 is read as its 16 raw bits and widened to float32 after slicing).
_STORAGE_DTYPES = {"BFloat16Storage": "<u2", "FloatStorage": "<f4", "HalfStorage": "<f2"}


class _StorageType:
    """Stands in for a torch storage class inside the pickle."""

    def __init__(self, name: str):
        self.name = name


@dataclass
class _Storage:
    kind: str
    data: np.ndarray  # 1-D, in the storage's own dtype


def _to_float32(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "BFloat16Storage":
        bits = x.astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return x.astype(np.float32)


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
    """Our stand-in for ``torch._utils._rebuild_tensor_v2``: a strided view of a storage."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
        raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride}")
    if 0 in size:
        return np.zeros(size, np.float32)
    data = storage.data
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if end > data.size or int(np.prod(size, dtype=np.int64)) > data.size:
        raise pickle.UnpicklingError(
            f"tensor of size {size} at offset {offset} overruns its storage of {data.size}"
        )
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=[s * data.itemsize for s in stride], writeable=False
    )
    return _to_float32(view, storage.kind)


def _rebuild_parameter(data, requires_grad, *unused) -> np.ndarray:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict; refuses every global that is not a tensor part."""

    def __init__(self, file, path: Path, load_storage):
        super().__init__(file)
        self.path = path
        self.load_storage = load_storage

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise _not_plain(self.path, f"{module}.{name}")

    def persistent_load(self, pid):
        ok = (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
        )
        if not ok:
            raise _not_plain(self.path, f"persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        return self.load_storage(kind.name, str(key), int(numel))


def _read_torch_zip(path: Path) -> Dict[str, np.ndarray]:
    """Read a ``torch.save`` zip archive without torch (and without running its pickle)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_archive(path, zf)
    except BlockPilotError:
        raise
    except zipfile.BadZipFile as e:
        if not zipfile.is_zipfile(path) and _looks_like_legacy_torch(path):
            raise BlockPilotError(
                f"{path} uses torch's legacy (pre-1.6) format; re-save it with a recent torch"
            )
        raise _corrupt(path, e)
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError,
            IndexError, TypeError, AttributeError, struct.error) as e:
        raise _corrupt(path, e)
    except MemoryError:
        raise BlockPilotError(
            f"ran out of memory reading {path}; it is corrupt or needs more memory than is free"
        )


def _looks_like_legacy_torch(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x80\x02"


def _read_archive(path: Path, zf: zipfile.ZipFile) -> Dict[str, np.ndarray]:
    pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl_names) != 1:
        raise _corrupt(path, "no single <archive>/data.pkl entry")
    prefix = pkl_names[0][: -len("data.pkl")]
    names = set(zf.namelist())
    big_endian = False
    if prefix + "byteorder" in names:
        big_endian = zf.read(prefix + "byteorder").strip() == b"big"
    storages: Dict[str, _Storage] = {}

    def load_storage(kind: str, key: str, numel: int) -> _Storage:
        if key not in storages:
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise pickle.UnpicklingError(f"missing storage {entry}")
            dtype = np.dtype(_STORAGE_DTYPES[kind])
            if big_endian:
                dtype = dtype.newbyteorder(">")
            raw = zf.read(entry)
            if len(raw) < numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {entry} is shorter than {numel} values")
            storages[key] = _Storage(kind, np.frombuffer(raw, dtype, count=numel))
        return storages[key]

    with zf.open(pkl_names[0]) as f:
        obj = _StateDictUnpickler(f, path, load_storage).load()
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    ):
        raise BlockPilotError(
            f"{path} does not hold a flat dict of named tensors; save model.state_dict()"
        )
    return dict(obj)


SAFETENSORS_FLOATS = ("F32", "F16", "BF16", "F64")


def _read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    """Read a safetensors file with the ``safetensors`` library (bf16 through MLX)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
            _check_float_dtypes(path, dtypes)
            out = {n: f.get_tensor(n).astype(np.float32) for n, d in dtypes.items() if d != "BF16"}
    except SafetensorError as e:
        raise _corrupt(path, e)
    bf16 = [n for n, d in dtypes.items() if d == "BF16"]
    if bf16:
        out.update(_read_bf16(path, bf16, "F64" in dtypes.values()))
    return {n: out[n] for n in dtypes}


def _check_float_dtypes(path: Path, dtypes: Dict[str, str]) -> None:
    for name, dtype in dtypes.items():
        if dtype not in SAFETENSORS_FLOATS:
            raise BlockPilotError(
                f"{path}: tensor {name} has dtype {dtype}; only float tensors are supported"
            )


def _read_bf16(path: Path, names: List[str], has_f64: bool) -> Dict[str, np.ndarray]:
    """bf16 tensors, which numpy has no dtype for, read with ``mx.load`` as float32."""
    if has_f64:  # mx.load refuses the whole file when any tensor is float64
        raise BlockPilotError(
            f"{path} mixes bfloat16 and float64 tensors; save it in a single float dtype"
        )
    try:
        tensors = mx.load(str(path))
        return {n: np.array(tensors[n].astype(mx.float32)) for n in names}
    except (RuntimeError, ValueError) as e:
        raise _corrupt(path, e)


# ---------------------------------------------------------------------------
# Conversion


_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


def _expected_keys(num_layers: int) -> List[str]:
    keys = [f"layers.{i}.{p}" for i in range(num_layers) for p in ("weight", "bias")]
    return keys + ["fc_out.weight", "fc_out.bias"]


def policy_config_from_state_dict(
    sd: Dict[str, np.ndarray],
    block_sizes: Optional[List[int]] = None,
    input_kind: str = "logits",
) -> PolicyConfig:
    """Infer the policy's shape from a state dict and check every tensor fits it."""
    indices = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))}
    num_layers = max(indices) + 1 if indices else 0
    expected = _expected_keys(num_layers)
    missing = [k for k in expected if k not in sd]
    extra = sorted(set(sd) - set(expected))
    if num_layers == 0 or missing or extra:
        problems = []
        if num_layers == 0 or missing:
            problems.append(f"missing {', '.join((missing or ['layers.0.weight'])[:5])}")
        if extra:
            problems.append(f"unexpected {', '.join(extra[:5])}")
        raise BlockPilotError(
            f"state dict is not a BlockPilot predictor ({'; '.join(problems)}); "
            f"expected keys layers.<i>.weight/bias and fc_out.weight/bias"
        )

    w0 = sd["layers.0.weight"]
    if w0.ndim != 2:
        raise BlockPilotError(f"layers.0.weight must be 2-D, got shape {w0.shape}")
    hidden, input_size = w0.shape
    num_classes = sd["fc_out.weight"].shape[0] if sd["fc_out.weight"].ndim == 2 else -1
    want = {"layers.0.weight": (hidden, input_size), "layers.0.bias": (hidden,)}
    for i in range(1, num_layers):
        want[f"layers.{i}.weight"] = (hidden, hidden)
        want[f"layers.{i}.bias"] = (hidden,)
    want["fc_out.weight"] = (num_classes, hidden)
    want["fc_out.bias"] = (num_classes,)
    for key, shape in want.items():
        if tuple(sd[key].shape) != shape:
            raise BlockPilotError(
                f"state dict tensor {key} has shape {tuple(sd[key].shape)}, expected {shape} "
                f"for a predictor with input {input_size} and hidden {hidden}; "
                f"the checkpoint is inconsistent"
            )

    if block_sizes is None:
        block_sizes = [14 + k for k in range(num_classes)]
    elif len(block_sizes) != num_classes:
        raise BlockPilotError(
            f"the checkpoint has {num_classes} classes but {len(block_sizes)} block sizes "
            f"were given; give one block size per class"
        )
    return PolicyConfig(
        input_kind=input_kind,
        input_size=int(input_size),
        hidden_size=int(hidden),
        num_layers=num_layers,
        block_sizes=list(block_sizes),
    )


def convert_policy(
    src: PathLike,
    out_dir: PathLike,
    *,
    block_sizes: Optional[List[int]] = None,
    input_kind: str = "logits",
    dtype: str = "float32",
    q_bits: Optional[int] = None,
    q_group_size: int = 64,
) -> Dict[str, Any]:
    """Convert a predictor checkpoint into ``out_dir`` (which must exist).

    Everything is read and checked before anything is written. Returns facts for
    a manifest: input kind and size, hidden size, layers, block sizes, dtype and
    quantization.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BlockPilotError(f"output directory {out_dir} does not exist; create it first")
    target = check_dtype(dtype)

    sd = read_state_dict(src)
    config = policy_config_from_state_dict(sd, block_sizes, input_kind)
    if q_bits is not None:
        check_quantization(q_bits, q_group_size, "policy", config.input_size)
    for key, value in sd.items():
        if not np.isfinite(value).all():
            raise BlockPilotError(
                f"{src}: tensor {key} has NaN or infinite values; the checkpoint is corrupt"
            )

    policy = BlockPolicy(config)
    weights = [(k, mx.array(sd.pop(k)).astype(target)) for k in list(sd)]
    policy.load_weights(weights, strict=True)
    del weights
    mx.eval(policy.parameters())
    if q_bits is not None:
        quantize_policy(policy, q_bits, q_group_size)
    save_policy(policy, out_dir)
    return {
        "input_kind": config.input_kind,
        "input_size": config.input_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "block_sizes": list(config.block_sizes),
        "dtype": dtype,
        "quantization": dict(config.quantization) if config.quantization else None,
    }
