"""Reading checkpoint and weights files so that a bad one stops the run naming it, and writing
checkpoints so that a failed write never replaces a good one.

Reading (every ``torch.load``, ``safe_open`` and safetensors ``load_file`` of the project goes
through these):

* ``load_torch_file``: ``torch.load`` with ``weights_only=True``; ``open_safetensors`` /
  ``load_safetensors``: a safetensors file. A file that cannot be read — truncated, empty, a
  folder, text, a broken header — is ``<file>: not a readable checkpoint (<reason>)``
  (``UnreadableCheckpoint``, the library's error chained); one whose unpickling could run code is
  refused without running it (``CodeInCheckpoint``).
* ``check_lightning_checkpoint``: what ``--ckpt_path`` names, checked before anything is built.

What was read:

* ``nonfinite_problems`` / ``refuse_nonfinite``: NaN / inf in floating tensors, by name (one such
  weight made every sampled image black);
* ``dtype_problem``: an integer or bool tensor where the model's is float (or the reverse) — a
  cast between float dtypes is fine, anything else would change the values silently.

Writing: ``AtomicCheckpointIO`` (the CLI's default for checkpoint files, ``use_atomic_checkpoint_io``)
writes beside the target, fsyncs, then renames onto it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors import safe_open
from safetensors.torch import load_file

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) format
PICKLE_MAGIC = b"\x80"  # the legacy format starts with a pickle protocol byte
# safetensors' dtype names → torch's
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class UnreadableCheckpoint(ValueError):
    """``<file>: not a readable checkpoint (<reason>)``."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: not a readable checkpoint ({reason})")
        self.path = Path(path)


class CodeInCheckpoint(ValueError):
    """A file whose unpickling needs arbitrary code (which could run code from the file)."""


# ------------------------------------------------------------------------------------ reading
def _check_file(path: Path) -> None:
    """The failures every reader has in common, with a reason worth reading."""
    if not path.exists():
        if path.is_symlink():
            raise FileNotFoundError(
                f"{path}: not a readable checkpoint (a symlink to {os.readlink(path)}, which does not exist)"
            )
        raise FileNotFoundError(f"{path}: not a readable checkpoint (no such file)")
    if path.is_dir():
        raise UnreadableCheckpoint(path, "a directory, not a file")
    if path.stat().st_size == 0:
        raise UnreadableCheckpoint(path, "an empty file")


def _first_line(err: BaseException) -> str:
    """The informative line of a library error (torch's weights-only errors open with boilerplate)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(boilerplate)] or lines
    line = lines[0].split(". This is an internal miniz error")[0] if lines else ""
    line = line.removeprefix("WeightsUnpickler error:").strip()
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _torch_reason(path: Path, err: BaseException) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(ZIP_MAGIC) and not head.startswith(PICKLE_MAGIC):
        return f"not a torch.save file: it starts with {head!r}; {_first_line(err)}"
    if (head.startswith(ZIP_MAGIC) and "central directory" in str(err)) or isinstance(err, EOFError):
        return f"cut short or damaged: {_first_line(err)}"
    return _first_line(err)


def load_torch_file(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (memory-mapped when ``mmap``; a legacy
    non-zip file is then read whole). Raises ``UnreadableCheckpoint`` / ``FileNotFoundError``
    naming the file, or ``CodeInCheckpoint`` for a file that needs arbitrary unpickling."""
    path = Path(path).expanduser()
    _check_file(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:  # a legacy (non-zip) torch.save file cannot be memory-mapped
            if not (mmap and "mmap can only be used" in str(err)):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or "Unsupported global" in str(err):
            raise CodeInCheckpoint(
                f"{path}: refusing to load — it needs arbitrary unpickling, which can run code "
                f"(not a checkpoint this project wrote?): {_first_line(err)}"
            ) from None
        raise UnreadableCheckpoint(path, _torch_reason(path, err)) from err
    except MemoryError:
        raise
    except Exception as err:  # torch's own errors name no file: truncated zip, EOF, garbage
        raise UnreadableCheckpoint(path, _torch_reason(path, err)) from err


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safe_open(path, framework="pt")``; a file it cannot open is ``UnreadableCheckpoint``."""
    path = Path(path).expanduser()
    _check_file(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except MemoryError:
        raise
    except Exception as err:  # SafetensorError: "Error while deserializing header: …", no file name
        raise UnreadableCheckpoint(path, f"not a complete safetensors file: {_first_line(err)}") from err
    with handle as f:
        yield f


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (CPU); a file it cannot read is ``UnreadableCheckpoint``."""
    path = Path(path).expanduser()
    _check_file(path)
    try:
        return load_file(str(path))
    except MemoryError:
        raise
    except Exception as err:
        raise UnreadableCheckpoint(path, f"not a complete safetensors file: {_first_line(err)}") from err


def check_lightning_checkpoint(path: str | Path, *, key: str = "--ckpt_path") -> None:
    """``path`` is a Lightning checkpoint file (a dict with ``state_dict``) or a sharded checkpoint
    folder (``meta.pt`` with ``global_step``): read memory-mapped, so cheap before the build."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}: '{path}' does not exist")
    if path.is_dir():
        where, need = path / "meta.pt", "global_step"
        if not where.is_file():
            raise UnreadableCheckpoint(
                path, "a directory without meta.pt: neither a checkpoint file nor a sharded checkpoint folder"
            )
        ckpt = load_torch_file(where)
    else:
        where, need = path, "state_dict"
        ckpt = load_torch_file(path, mmap=True)
    if not isinstance(ckpt, dict) or need not in ckpt:
        held = f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise UnreadableCheckpoint(
            where, f"no '{need}' entry, so not a Lightning checkpoint; it holds {held}"
        )


# --------------------------------------------------------------------------- what was read
def named_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts / lists, named by its path (``optimizer_states.0.state.3.exp_avg``)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nonfinite_count(tensor: torch.Tensor) -> str | None:
    """``"1 nan"`` / ``"2 inf"`` / ``"1 nan, 2 inf"`` for a floating tensor that is not finite, else None."""
    if hasattr(tensor, "to_local"):  # a DTensor: this rank's shard
        tensor = tensor.to_local()
    if not tensor.is_floating_point() or tensor.device.type == "meta" or bool(torch.isfinite(tensor).all()):
        return None
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    return ", ".join(f"{n} {what}" for n, what in ((nan, "nan"), (inf, "inf")) if n)


def nonfinite_problems(tensors: Mapping[str, torch.Tensor], *, prefix: str = "") -> list[str]:
    """``"'name' (1 nan)"`` for every floating tensor holding NaN or inf."""
    return [
        f"'{prefix}{name}' ({count})"
        for name, tensor in tensors.items()
        if isinstance(tensor, torch.Tensor) and (count := nonfinite_count(tensor))
    ]


def nonfinite_message(where: str, problems: list[str]) -> str:
    more = f" and {len(problems) - 8} more" if len(problems) > 8 else ""
    return (
        f"{where}: non-finite values in {len(problems)} tensor(s): {', '.join(problems[:8])}{more}; "
        "refusing to load them (every image sampled from such weights is black)"
    )


def refuse_nonfinite(tensors: Mapping[str, torch.Tensor], where: str, *, prefix: str = "") -> None:
    problems = nonfinite_problems(tensors, prefix=prefix)
    if problems:
        raise ValueError(nonfinite_message(where, problems))


def dtype_name(dtype: torch.dtype | str) -> str:
    """torch dtypes and safetensors' names (``F32``) alike → ``float32``."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return SAFETENSORS_DTYPES.get(dtype, dtype)


def dtype_problem(name: str, given: torch.dtype | str, wanted: torch.dtype) -> str | None:
    """A file tensor of dtype ``given`` for the model's tensor of dtype ``wanted``: between float
    dtypes it is cast; an integer or bool one for a float one (or any other difference) is not."""
    given, want = dtype_name(given), dtype_name(wanted)
    if given == want or (_is_float(given) and _is_float(want)):
        return None
    return f"'{name}' is {given}, the model's is {want} (only float tensors are cast to a float dtype)"


def _is_float(name: str) -> bool:
    return name.startswith(("float", "bfloat"))


# ------------------------------------------------------------------------------------ writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose write never leaves a partial file where a checkpoint goes.

    Lightning's writes the new checkpoint through a temporary file in ``$TMPDIR`` and moves it
    over the target — a copy, in place, when ``$TMPDIR`` is on another file system than the run
    (node-local ``/tmp`` on clusters): disk full then left a truncated ``last.ckpt``. This one
    writes ``.<name>.<random>.tmp`` in the target's own folder, fsyncs it, ``os.replace``s it onto
    the target (atomic on one file system) and fsyncs the folder; on any failure the temporary is
    removed and the previous file is untouched. Remote (fsspec URL) paths keep Lightning's write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))


def _is_local(path) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``: all of it at ``path``, or ``path`` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; a file system that cannot fsync a folder says so with EINVAL."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def use_atomic_checkpoint_io(strategy) -> bool:
    """Give ``strategy`` the ``AtomicCheckpointIO`` where it would use Lightning's plain
    ``TorchCheckpointIO`` (single device, DDP, ``ModelParallelStrategy`` writing one file); a
    configured plugin stays. A sharded checkpoint folder (``ModelParallelStrategy``,
    ``save_distributed_checkpoint: true``) is written by ``torch.distributed.checkpoint``, not
    through it. Returns whether it was installed."""
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
