"""Trainer checkpoints that resume without hands.

A checkpoint counts as complete only when :class:`SealCheckpoints` has checked its files
(``trainer_state.json`` parses, every safetensors file has a whole header and body; an FSDP
checkpoint's distributed-checkpoint folders, ``pytorch_model_fsdp_0/`` and ``optimizer_0/``,
have metadata whose every entry lies inside its ``.distcp`` file) and then
written ``integrity.json`` (sha256 of every file) into it, last. :func:`last_complete_checkpoint`
returns the newest checkpoint whose seal still verifies and whose pickle files (RNG, optimizer,
scheduler state, which the Trainer unpickles on resume) load as weights only, and removes the
others, so a save cut by a power loss, a file damaged since, or a pickle payload resealed into
it, falls back to the previous checkpoint. The callback
also keeps the previous checkpoint until the new one is sealed (the Trainer's own rotation
would delete it first).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from refrag.io.integrity import (
    PICKLE_SUFFIXES,
    IntegrityError,
    UnsafeFolderError,
    check_pickle,
    verify_folder,
    write_manifest,
)
from refrag.train.sharding import SHARDED_OPTIMIZER_DIR, is_sharded_checkpoint

NOT_LOADED_ON_RESUME = {"training_args.bin"}  # a pickled TrainingArguments, never read back


def check_checkpoint_pickles(folder: str | os.PathLike) -> None:
    """Raise :class:`UnsafeFolderError` unless every pickle file the Trainer reads on resume
    loads with ``weights_only=True`` (with numpy's RNG state allowed, as the Trainer does)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix in PICKLE_SUFFIXES and path.name not in NOT_LOADED_ON_RESUME:
            with safe_globals():
                check_pickle(path)


def check_checkpoint_files(folder: str | os.PathLike) -> None:
    """Raise :class:`IntegrityError` if a Trainer checkpoint's state or weights are incomplete."""
    folder = Path(folder)
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        raise IntegrityError(folder / "trainer_state.json", f"is unreadable ({err})") from None
    if is_sharded_checkpoint(folder):
        check_distributed_checkpoint(folder)
        return
    weights = sorted(folder.rglob("*.safetensors"))
    if not weights:
        raise IntegrityError(folder, "holds no *.safetensors weights (nor FSDP shards)")
    for path in weights:
        try:
            with safe_open(str(path), "pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    fh.get_slice(name)
        except Exception as err:  # noqa: BLE001 - any safetensors failure: unusable
            raise IntegrityError(path, f"is unreadable ({type(err).__name__})") from None


def check_distributed_checkpoint(folder: Path) -> None:
    """The Trainer's FSDP checkpoint: the model's and the optimizer's distributed checkpoints
    each have readable metadata, and every tensor it lists lies inside an existing shard."""
    for sub in sorted(p for p in folder.iterdir() if (p / ".metadata").is_file()):
        try:
            metadata = FileSystemReader(str(sub)).read_metadata()
        except Exception as err:  # noqa: BLE001 - any unreadable metadata: unusable
            raise IntegrityError(
                sub / ".metadata", f"is unreadable ({type(err).__name__})"
            ) from None
        for info in (metadata.storage_data or {}).values():
            shard = sub / info.relative_path
            if not shard.is_file() or shard.stat().st_size < info.offset + info.length:
                raise IntegrityError(shard, "is missing or cut short")
    if not any(p.name.startswith(SHARDED_OPTIMIZER_DIR) for p in folder.iterdir()):
        raise IntegrityError(folder, "holds FSDP model shards but no optimizer shards")


def _checkpoints(work_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, oldest first."""
    found = [p for p in work_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
    return sorted(
        (p for p in found if p.name.rsplit("-", 1)[1].isdigit()),
        key=lambda p: int(p.name.rsplit("-", 1)[1]),
    )


def last_complete_checkpoint(work_dir: str | os.PathLike) -> str | None:
    """Newest sealed checkpoint under ``work_dir`` whose files still match their seal.

    Unsealed, damaged or unsafe checkpoints are reported and (by rank 0 only) removed.
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    for path in reversed(_checkpoints(work_dir)):
        try:
            verify_folder(path)
            check_checkpoint_pickles(path)
            return str(path)
        except (IntegrityError, UnsafeFolderError) as err:
            print(f"skipping checkpoint {path.name}: {err.path.name} {err.problem}", flush=True)
            if is_rank0:
                shutil.rmtree(path, ignore_errors=True)
    return None


class SealCheckpoints(TrainerCallback):
    """After each Trainer save: check the new checkpoint's files, seal it, and only then remove
    older ones (keep ``save_total_limit=None`` in the TrainingArguments)."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        work_dir = Path(args.output_dir)
        new = work_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        check_checkpoint_files(new)
        write_manifest(new)
        for old in _checkpoints(work_dir):
            if old != new:
                shutil.rmtree(old, ignore_errors=True)


def resumed_train_loss(
    log_history: list[dict], resumed_mean: float, resumed_from: int, final_step: int
) -> float:
    """Mean training loss over every step of a resumed run: the Trainer's mean over the steps
    after ``resumed_from``, combined with the losses logged up to it (each a mean over the
    steps since the previous log entry)."""
    before, covered, previous = 0.0, 0, 0
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry and step <= resumed_from:
            before += entry["loss"] * (step - previous)
            covered, previous = step, step
    after = final_step - resumed_from
    return (before + resumed_mean * after) / max(covered + after, 1)
