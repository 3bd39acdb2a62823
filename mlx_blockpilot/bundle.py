"""The bundle on disk (target/, draft/, policy/, blockpilot.json) and every compatibility check.

The same checks run when a bundle is converted and when anything is loaded.
"""

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from .errors import BlockPilotError

MANIFEST = "blockpilot.json"
FORMAT = "mlx_blockpilot.bundle"
FORMAT_VERSION = 1


@dataclass
class TargetFacts:
    """What the drafter and the policy must agree with."""

    hidden_size: int
    vocab_size: int
    num_layers: int

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "TargetFacts":
        cfg = cfg.get("text_config", cfg)
        return cls(cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"])

    @classmethod
    def from_model(cls, model) -> "TargetFacts":
        from . import target

        return cls(target.hidden_size(model), target.vocab_size(model), target.num_layers(model))


def check_draft(facts: TargetFacts, cfg) -> None:
    """Raise if a drafter config (``DraftConfig``) cannot run on this target."""
    if cfg.hidden_size != facts.hidden_size:
        raise BlockPilotError(
            f"drafter hidden size {cfg.hidden_size} does not match the target's {facts.hidden_size}; "
            "use the drafter trained for this target"
        )
    if cfg.vocab_size != facts.vocab_size:
        raise BlockPilotError(
            f"drafter vocab size {cfg.vocab_size} does not match the target's {facts.vocab_size}; "
            "use the drafter trained for this target"
        )
    if cfg.num_target_layers != facts.num_layers:
        raise BlockPilotError(
            f"drafter was trained for a target with {cfg.num_target_layers} layers, this target has "
            f"{facts.num_layers}; use the drafter trained for this target"
        )
    bad = [i for i in cfg.target_layer_ids if not 0 <= i < facts.num_layers]
    if bad:
        raise BlockPilotError(
            f"drafter target_layer_ids {bad} are outside the target's layers 0..{facts.num_layers - 1}"
        )
    if not 0 <= cfg.mask_token_id < facts.vocab_size:
        raise BlockPilotError(
            f"drafter mask_token_id {cfg.mask_token_id} is outside the vocabulary (size {facts.vocab_size})"
        )


def check_policy(facts: TargetFacts, cfg) -> None:
    """Raise if a policy config (``PolicyConfig``) does not read this target's features."""
    want = facts.vocab_size if cfg.input_kind == "logits" else facts.hidden_size
    if cfg.input_size != want:
        raise BlockPilotError(
            f"policy reads {cfg.input_size} {cfg.input_kind} features but the target gives {want}; "
            "use a policy trained for this target"
        )
    if any(b < 1 for b in cfg.block_sizes):
        raise BlockPilotError(f"policy block sizes must be >= 1, got {cfg.block_sizes}")


@dataclass
class Bundle:
    """Everything needed to generate: target model + tokenizer, drafter, optional policy."""

    model: Any
    tokenizer: Any
    draft: Any
    policy: Any = None
    path: Optional[Path] = None
    costs: Any = None  # this machine's round costs (costs.calibrate, as costs.LearnedCosts), once measured
    acceptance: Any = None  # how often drafts were accepted over the session (schedule.session_acceptance)
    target_dir: Optional[Path] = None  # where the target and the drafter were loaded from
    draft_dir: Optional[Path] = None

    @property
    def default_block_size(self):
        return "auto" if self.policy is not None else self.draft.config.block_size


def _need_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise BlockPilotError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise BlockPilotError(f"{what} {path} is not a directory")
    return path


def load_target(path):
    """Load an mlx-lm model directory; returns (model, tokenizer)."""
    from mlx_lm import load as mlx_lm_load

    from . import target

    path = _need_dir(Path(path), "target")
    if not (path / "config.json").is_file():
        raise BlockPilotError(f"no config.json in target directory {path}")
    try:
        model, tokenizer = mlx_lm_load(str(path))
    except Exception as e:  # mlx-lm raises many kinds for unreadable checkpoints
        raise BlockPilotError(f"cannot load target from {path}: {e}") from None
    target.check_supported(model)
    return model, tokenizer


def load(
    path=None,
    *,
    target=None,
    draft=None,
    policy=None,
) -> Bundle:
    """Load a converted bundle directory, or a target + drafter (+ policy) given apart."""
    from .draft import load_draft, read_draft_config
    from .policy import load_policy

    if path is not None:
        root = _need_dir(Path(path), "bundle")
        if not (root / MANIFEST).is_file():
            raise BlockPilotError(f"{root} is not a bundle (no {MANIFEST}); make one with python -m mlx_blockpilot.convert")
        manifest = check_manifest(root)
        manifest_target = manifest.get("target") if target is None else None
        target = target or root / "target"
        draft = draft or root / "draft"
        if policy is None and (root / "policy").is_dir():
            policy = root / "policy"
    if target is None or draft is None:
        raise BlockPilotError("give a bundle directory, or both a target and a drafter directory")
    model, tokenizer = load_target(target)
    facts = TargetFacts.from_model(model)
    if path is not None and manifest_target:
        check_manifest_target(root, manifest_target, facts)
    draft = _need_dir(Path(draft), "drafter")
    check_draft(facts, read_draft_config(draft)[0])
    drafter = load_draft(draft)
    pol = None
    if policy is not None:
        pol = load_policy(_need_dir(Path(policy), "policy"))
        check_policy(facts, pol.config)
    return Bundle(model, tokenizer, drafter, pol, Path(path) if path is not None else None,
                  target_dir=Path(target), draft_dir=draft)


def read_manifest(path) -> Dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def check_manifest(root) -> Dict[str, Any]:
    """Read and validate ``root/blockpilot.json`` (load time); returns the manifest."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlockPilotError(f"cannot read bundle manifest {path} ({e}); convert the bundle again") from None
    if not isinstance(manifest, dict):
        raise BlockPilotError(f"bundle manifest {path} is not a JSON object; convert the bundle again")
    if manifest.get("format", FORMAT) != FORMAT:
        raise BlockPilotError(f"{path} is not an mlx_blockpilot bundle manifest (format {manifest['format']!r})")
    if not isinstance(manifest.get("target", {}), (dict, type(None))):
        raise BlockPilotError(f"bundle manifest {path} has a malformed 'target' entry; convert the bundle again")
    version = manifest.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BlockPilotError(
            f"bundle {root} has format version {version!r}, newer than this mlx_blockpilot reads "
            f"({FORMAT_VERSION}); upgrade mlx_blockpilot"
        )
    return manifest


def check_manifest_target(root, recorded: Dict[str, Any], facts: TargetFacts) -> None:
    """Raise if the bundle's target/ is not the model its manifest records."""
    for key in ("hidden_size", "vocab_size", "num_layers"):
        if key in recorded and recorded[key] != getattr(facts, key):
            raise BlockPilotError(
                f"bundle {root}: target/ has {key} {getattr(facts, key)} but {MANIFEST} records "
                f"{recorded[key]}; the bundle was modified, convert it again"
            )


def package_versions() -> Dict[str, str]:
    import mlx.core as mx
    import mlx_lm

    from . import __version__

    return {"mlx": mx.__version__, "mlx-lm": mlx_lm.__version__, "mlx_blockpilot": __version__}


def write_manifest(root, manifest: Dict[str, Any]) -> Path:
    """Write ``root/blockpilot.json`` (adds format, version and package versions)."""
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": package_versions()}
    data.update(manifest)
    path = Path(root) / MANIFEST
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def check_out_dir(out, force: bool = False) -> Path:
    """Raise unless ``out`` may be written (absent, or an existing directory with ``force``)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise BlockPilotError(f"{out} already exists; pass --force to replace it, or choose another --out")
        if out.is_symlink() or not out.is_dir():
            raise BlockPilotError(f"{out} exists and is not a directory; remove it or choose another --out")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out) -> List[Path]:
    """Remove temporary directories of ``out`` left by conversions that were killed (their
    process is gone: SIGKILL runs no clean-up); returns what was removed."""
    out = Path(out)
    parent = out.absolute().parent
    removed = []
    # exactly write_bundle's names (".NAME.PID.RANDOM.tmp"): not ".NAME.v2.PID.RANDOM.tmp" of an output "NAME.v2"
    ours = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[^.]+\.tmp")
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = ours.fullmatch(p.name)
        if m and p.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def write_bundle(out, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; rename it to ``out`` if the block succeeds.

    On any error or interrupt the temporary directory is removed and ``out`` is
    left as it was. An existing ``out`` is refused unless ``force``; then it is
    replaced only after success. The temporary's name carries this process's id, so
    the next conversion of ``out`` removes it if this process was killed outright.
    """
    out = check_out_dir(out, force)
    parent = out.absolute().parent
    created = [p for p in [parent, *parent.parents] if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        check_out_dir(out, force)  # it may have appeared meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            old.rmdir()
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents we made, innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise
