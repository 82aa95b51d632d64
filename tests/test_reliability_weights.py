"""Weights and checkpoints that must not load, and checkpoint writes that must not destroy one.

* a tensor holding NaN / inf — in a Lightning checkpoint (``--ckpt_path``: weights, EMA,
  optimiser state), an ``init_weights`` file (whole or read row by row by the sharded start),
  a pretrained component folder, or the authors' file for ``convert-authors`` — is refused naming
  the file and the tensor (it gave all-black images with exit code 0);
* integer / bool tensors where the model has float ones are refused, not cast;
* a file that cannot be read is ``<file>: not a readable checkpoint (<reason>)``, the library's
  error chained, wherever a checkpoint or weights file is opened; ``--ckpt_path`` is checked
  before anything is built;
* a checkpoint write that fails (disk full) leaves the previous file whole, no temporary behind;
* SLURM auto-resume with checkpoints none of which can be read fails instead of starting over;
* ``export`` does not write into a non-empty folder without ``--overwrite``.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from safetensors.torch import load_file, save_file

from mige_cli.main import main
from mige_lightning.models import build_mige, get_config
from mige_lightning.module import MIGELightningModule
from tests.helpers.batches import make_batch
from tests.helpers.training import FROM_SCRATCH, LinearModule, bare_trainer

REPO = Path(__file__).resolve().parents[1]
POISON = {"nan": float("nan"), "inf": float("inf")}


def _poison(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out.view(-1)[0] = value
    return out


def _unreadable(path) -> str:
    """The message every reader gives for a file it cannot read (a regex)."""
    return rf"{re.escape(str(path))}: not a readable checkpoint \("


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A Lightning checkpoint of the tiny module after one optimiser step (CPU)."""
    root = tmp_path_factory.mktemp("tiny_ckpt")
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", warmup_steps=1)
    trainer = bare_trainer(root, max_steps=1)
    batch = make_batch(module.config, [1])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    path = root / "good.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("requests")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "ref.png")
    request = {"id": "a", "task": "subject", "instruction": "a <imagehere>", "images": ["ref.png"]}
    (root / "req.jsonl").write_text(json.dumps({**request, "num_inference_steps": 2}) + "\n")
    return root / "req.jsonl"


def _predict(ckpt: Path, requests: Path, out: Path) -> None:
    main(
        [
            "predict",
            "--data=datamodules.RequestDataModule",
            f"--data.requests={requests}",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.callbacks+=callbacks.prediction_writer.PredictionWriter",
            f"--trainer.callbacks.output_dir={out}",
            "--ckpt_path",
            str(ckpt),
        ]
    )


def _weights_file(tmp_path: Path, change=None) -> Path:
    """A tiny model's ``model.safetensors`` (as ``convert-authors`` writes it), ``change`` applied."""
    state = {
        k: v
        for k, v in build_mige(get_config("tiny"), seed=1).state_dict().items()
        if not k.startswith("autoencoder.")
    }
    state.pop("encoder.t5.encoder.embed_tokens.weight")  # tied to shared: saved once
    if change is not None:
        change(state)
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


def _load_eager(weights: Path) -> MIGELightningModule:
    module = MIGELightningModule("tiny", init_weights=str(weights))
    module.configure_model()
    return module


def _load_sharded_start(weights: Path) -> None:
    """What the sharded start does with ``init_weights`` on one rank (no process group): map every
    tensor to the file (header checks), then read its rows."""
    from mige_lightning.models.tensor_sources import load_local_rows, tensor_sources

    config = get_config("tiny")
    model = build_mige(config, seed=0)
    with torch.no_grad():
        problems = load_local_rows(model, tensor_sources(config, model, init_weights=str(weights)))
    if problems:
        raise ValueError("; ".join(problems))


# ======================================================================= 1. non-finite weights
@pytest.mark.parametrize(
    ("where", "value"),
    [("state_dict", "nan"), ("state_dict", "inf"), ("ema", "nan")],
)
def test_predict_refuses_a_checkpoint_with_a_non_finite_tensor(
    tiny_ckpt, requests_file, tmp_path, where, value
):
    """One NaN weight (or EMA weight, which predict samples with) gave all-black images, exit 0."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    key = "model.dit.proj_out.weight"
    if where == "ema":  # the EMA callback's entry: parameter name → its average
        ckpt["ema"] = {k: ckpt["state_dict"][k].clone() for k in (key, "model.dit.proj_out.bias")}
        ckpt["ema"][key] = _poison(ckpt["ema"][key], POISON[value])
        key = f"ema.{key}"
    else:
        ckpt["state_dict"][key] = _poison(ckpt["state_dict"][key], POISON[value])
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    out = tmp_path / "out"
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(bad))}: non-finite values in 1 tensor\(s\): '{re.escape(key)}' \(1 {value}\)",
    ):
        _predict(bad, requests_file, out)
    assert not list(out.glob("**/*.png"))


def test_fit_refuses_to_resume_from_non_finite_optimiser_state(tiny_ckpt, tmp_path):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    state = ckpt["optimizer_states"][0]["state"]
    first = sorted(state)[0]
    state[first]["exp_avg_sq"] = _poison(state[first]["exp_avg_sq"], float("inf"))
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    module = MIGELightningModule("tiny", warmup_steps=1)
    trainer = bare_trainer(tmp_path, max_steps=2)
    batch = make_batch(module.config, [1])
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(bad))}: non-finite values in 1 tensor\(s\): "
        rf"'optimizer_states\.0\.state\.{first}\.exp_avg_sq' \(1 inf\)",
    ):
        trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None), ckpt_path=bad)


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("start", ["eager", "sharded"])
def test_init_weights_with_a_non_finite_tensor_is_refused(tmp_path, start, value):
    def change(state):
        state["dit.proj_out.weight"] = _poison(state["dit.proj_out.weight"], POISON[value])

    weights = _weights_file(tmp_path, change)
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}.*'dit\.proj_out\.weight'.*1 {value}"):
        (_load_eager if start == "eager" else _load_sharded_start)(weights)


def _sharded_worker(rank: int, port: int, weights: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mige_lightning.sharding import build_sharded_mige

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        build_sharded_mige(get_config("tiny"), init_device_mesh("cpu", (2,)), seed=0, init_weights=weights)
        result = "built"
    except ValueError as err:
        result = str(err)
    finally:
        Path(out, f"rank{rank}.txt").write_text(result)
        # both ranks stop at the same check; tear the group down together (one rank destroying it
        # while the other's gloo thread still talks aborted the process once: SIGABRT at exit)
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_sharded_start_refuses_a_non_finite_row_on_every_rank(tmp_path):
    """Each rank reads only its own rows: an inf in rank 1's rows must stop rank 0 too (it went
    on alone and waited in its first collective; a NaN was reported as 'neither drawn nor read')."""
    from tests.helpers.processes import free_port, spawn

    def change(state):
        weight = state["dit.proj_out.weight"].clone()
        weight[-1, 0] = float("inf")  # the last row: rank 1's shard of dim 0
        state["dit.proj_out.weight"] = weight

    weights = _weights_file(tmp_path, change)
    spawn(_sharded_worker, (free_port(), str(weights), str(tmp_path)), nprocs=2, timeout=300)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert re.search(rf"{re.escape(str(weights))} 'dit\.proj_out\.weight' rows \d+:\d+ .*1 inf", text), (
            rank,
            text,
        )


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    from tests.helpers.pretrained_parts import save_components

    root = tmp_path_factory.mktemp("parts")
    return root, save_components(root, get_config("tiny"))


@pytest.mark.parametrize(
    ("component", "file", "key", "names"),
    [
        ("t5", "t5/model.safetensors", "shared.weight", r"model\.pretrained\.t5.*'shared\.weight'"),
        ("blip2", None, "qformer.layernorm.weight", r"qformer\.layernorm\.weight"),
        (
            "dit",
            "pixart/transformer/diffusion_pytorch_model.safetensors",
            "proj_out.weight",
            r"model\.pretrained\.dit.*'proj_out\.weight'",
        ),
        ("null_embedding", "null.safetensors", "y_embedding", r"null\.safetensors.*'y_embedding'"),
    ],
)
def test_a_pretrained_component_with_a_non_finite_tensor_is_refused(
    tiny_parts, tmp_path, component, file, key, names
):
    root, sources = tiny_parts
    parts = tmp_path / "parts"
    shutil.copytree(root, parts)
    sources = {k: v.replace(str(root), str(parts)) if isinstance(v, str) else v for k, v in sources.items()}
    if file is None:  # the BLIP-2 shard holding the key
        index = json.loads((parts / "blip2/model.safetensors.index.json").read_text())
        file = f"blip2/{index['weight_map'][key]}"
    tensors = load_file(str(parts / file))
    tensors[key] = _poison(tensors[key], float("nan"))
    save_file(tensors, str(parts / file), metadata={"format": "pt"})
    only = {k: v for k, v in sources.items() if k in ("tokenizer", component) or k.startswith(component)}
    with pytest.raises(ValueError, match=rf"{names}.*1 nan"):
        build_mige(get_config("tiny", pretrained={"tokenizer": "byte", **only}))


# ------------------------------------------------------------------------ convert-authors
def test_convert_authors_refuses_a_non_finite_tensor_with_a_non_zero_exit(tmp_path):
    from tests.helpers.authors import authors_tiny_state

    state = authors_tiny_state()
    state["t_block.1.weight"] = _poison(state["t_block.1.weight"], float("nan"))
    src = tmp_path / "model.pth"
    torch.save({"state_dict": state}, src)
    out = tmp_path / "converted"
    run = subprocess.run(
        [sys.executable, "-m", "mige_lightning", "convert-authors", "--input", str(src), "--output", str(out)]
        + ["--preset", "tiny", "--tokenizer", "byte", "--vae", "none"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0, run.stdout
    assert "t_block.1.weight" in run.stderr and "not finite" in run.stderr, run.stderr[-2000:]
    assert not out.exists()


# ===================================================================== 2. silent dtype coercion
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("start", ["eager", "sharded"])
def test_init_weights_with_integer_tensors_where_the_model_has_floats_is_refused(tmp_path, start, dtype):
    def change(state):
        state["dit.proj_out.weight"] = state["dit.proj_out.weight"].to(dtype)

    weights = _weights_file(tmp_path, change)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(weights))}.*'dit\.proj_out\.weight' is {name}, the model's is float32",
    ):
        (_load_eager if start == "eager" else _load_sharded_start)(weights)
    # float16 / bfloat16 files still load into the float32 model (a cast between floats is fine)
    for half in (torch.float16, torch.bfloat16):
        weights = _weights_file(
            tmp_path / str(half),
            lambda s, half=half: s.update({k: v.to(half) for k, v in s.items() if v.is_floating_point()}),
        )
        if start == "eager":
            module = _load_eager(weights)
            expected = load_file(str(weights))["dit.proj_out.weight"].float()
            assert torch.equal(module.model.dit.proj_out.weight, expected)
        else:
            _load_sharded_start(weights)


def test_convert_authors_refuses_an_integer_tensor_where_a_float_one_is_expected(tmp_path):
    from mige_lightning.authors_checkpoint import ConversionError
    from tests.helpers.authors import authors_tiny_state

    state = authors_tiny_state()  # its Q-Former position_ids are int64: legitimately, and dropped
    state["t_block.1.weight"] = state["t_block.1.weight"].to(torch.int64)
    src = tmp_path / "model.pth"
    torch.save({"state_dict": state}, src)
    out = tmp_path / "converted"
    with pytest.raises(
        ConversionError,
        match=r"t_block\.1\.weight is int64 where our float tensor dit\.adaln_single\.linear\.weight is expected",
    ):
        main(
            ["convert-authors", "--input", str(src), "--output", str(out), "--preset", "tiny"]
            + ["--tokenizer", "byte", "--vae", "none"]
        )
    assert not out.exists()


# ========================================================================= 3. atomic writes
def _cli_checkpoint_io(tmp_path, monkeypatch):
    """The checkpoint IO of the trainer ``fit`` builds from the demo config."""
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["--config", str(REPO / "configs/demo.yaml"), *FROM_SCRATCH, "--trainer.logger=false"], run=False
    )
    return cli.trainer.strategy.checkpoint_io


def _disk_full_in(folder: Path, monkeypatch, *, budget: int = 64) -> None:
    """Writes into ``folder`` fail with ENOSPC after ``budget`` bytes; a rename from another folder
    fails with EXDEV (TMPDIR on another file system than the run folder, as on cluster nodes)."""
    real_open, real_rename = builtins.open, os.rename

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            room = budget - self.written
            if len(data) > room:
                self.f.write(bytes(data[:room]))
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.f.write(data)

        def fileno(self):  # no sendfile shortcut around write()
            raise OSError("no fileno")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        inside = isinstance(file, (str, os.PathLike)) and Path(file).resolve().parent == folder.resolve()
        return Full(f) if inside and any(c in mode for c in "wax+") else f

    def rename(src, dst, *args, **kwargs):
        if Path(src).resolve().parent != Path(dst).resolve().parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "rename", rename)


def test_a_checkpoint_write_that_fills_the_disk_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """Lightning wrote the new checkpoint over the old one in place (via a TMPDIR copy): disk full
    left a truncated last.ckpt. The CLI's trainer now writes beside it, fsyncs and renames."""
    io = _cli_checkpoint_io(tmp_path, monkeypatch)
    folder = tmp_path / "run" / "checkpoints"
    target = folder / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(1000.0)}, target)
    before = target.read_bytes()
    _disk_full_in(folder, monkeypatch)
    with pytest.raises((OSError, RuntimeError)):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


def test_atomic_checkpoint_io_cleans_up_after_a_failing_serialisation(tmp_path, monkeypatch):
    from mige_lightning.checkpoint_files import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)
    before = target.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("save_last", [True, "link"])
def test_model_checkpoint_last_copy_and_link_work_with_atomic_writes(tmp_path, save_last):
    from mige_lightning.checkpoint_files import AtomicCheckpointIO

    folder = tmp_path / "checkpoints"
    callback = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, save_last=save_last)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=tmp_path,
    )
    trainer.fit(LinearModule())
    last = folder / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert last.is_symlink() == (save_last == "link")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]


# ==================================================================== 4. unreadable files
def _bad_torch_file(tmp_path: Path, kind: str, good: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n" * 20)
    elif kind == "symlink-to-text":
        (tmp_path / "notes.txt").write_text("hello\n" * 20)
        path.symlink_to(tmp_path / "notes.txt")
    elif kind == "directory":
        path.mkdir()
        (path / "something.txt").write_text("x")
    return path


TORCH_KINDS = ["truncated", "empty", "text", "symlink-to-text", "directory"]


@pytest.mark.parametrize("kind", TORCH_KINDS)
@pytest.mark.parametrize(
    "reader", ["load_checkpoint_file", "convert-authors", "null_embedding", "slurm-step", "judge-synthetic"]
)
def test_unreadable_torch_files_are_named_with_the_reason(tiny_ckpt, tmp_path, kind, reader):
    from mige_cli.slurm import checkpoint_step
    from mige_lightning.checkpoint_state import load_checkpoint_file
    from mige_lightning.models.loading import load_tensor_file

    path = _bad_torch_file(tmp_path, kind, tiny_ckpt)
    if reader == "null_embedding":
        path = path.rename(path.with_suffix(".pt")) if not path.is_symlink() else path
    with pytest.raises(Exception, match=_unreadable(path)) as err:
        if reader == "load_checkpoint_file":
            load_checkpoint_file(path)
        elif reader == "convert-authors":
            main(
                [
                    "convert-authors",
                    "--input",
                    str(path),
                    "--output",
                    str(tmp_path / "out"),
                    "--preset",
                    "tiny",
                ]
            )
        elif reader == "null_embedding":
            load_tensor_file(str(path))
        elif reader == "judge-synthetic":
            from mige_cli.judge_synthetic import judge_checkpoint

            judge_checkpoint(path, tmp_path / "world")
        else:
            checkpoint_step(path)
    assert err.value.__cause__ is not None or kind == "directory" or kind == "empty"
    assert not (tmp_path / "out").exists()


def _bad_safetensors(tmp_path: Path, kind: str) -> Path:
    good = _weights_file(tmp_path / "good")
    path = tmp_path / "bad" / "model.safetensors"
    path.parent.mkdir()
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "broken-header":
        n = int.from_bytes(data[:8], "little")
        path.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n :])
    elif kind == "text":
        path.write_text("not safetensors\n" * 20)
    return path


@pytest.mark.parametrize("kind", ["truncated", "empty", "broken-header", "text"])
@pytest.mark.parametrize(
    "reader", ["init_weights", "sharded-init_weights", "null_embedding", "load_exported"]
)
def test_unreadable_safetensors_files_are_named_with_the_reason(tmp_path, kind, reader):
    from mige_cli.export import load_exported
    from mige_lightning.models.loading import load_tensor_file

    path = _bad_safetensors(tmp_path, kind)
    with pytest.raises(Exception, match=_unreadable(path)) as err:
        if reader == "init_weights":
            _load_eager(path)
        elif reader == "sharded-init_weights":
            _load_sharded_start(path)
        elif reader == "null_embedding":
            load_tensor_file(str(path))
        else:
            from mige_cli.export import FORMAT
            from mige_lightning.prompt import PROMPT_VERSION

            config = {"format": FORMAT, "prompt_version": PROMPT_VERSION, "hparams": {"preset": "tiny"}}
            (path.parent / "config.json").write_text(json.dumps(config))
            load_exported(path.parent)
    assert err.value.__cause__ is not None or kind == "empty"  # the library's error, chained


@pytest.mark.parametrize("kind", [*TORCH_KINDS, "not-a-lightning-checkpoint", "missing"])
def test_ckpt_path_is_checked_before_anything_is_built(tiny_ckpt, requests_file, tmp_path, monkeypatch, kind):
    from mige_cli.cli import MIGECLI

    if kind == "not-a-lightning-checkpoint":
        path = tmp_path / "weights.pth"
        torch.save({"a": torch.zeros(3)}, path)
    elif kind == "missing":
        path = tmp_path / "nope.ckpt"
    else:
        path = _bad_torch_file(tmp_path, kind, tiny_ckpt)
    built = []
    monkeypatch.setattr(MIGECLI, "instantiate_classes", lambda self: built.append(1))
    expected = {
        "missing": rf"--ckpt_path: '{re.escape(str(path))}' does not exist",
        "directory": _unreadable(path) + r"a directory without meta\.pt",
        "not-a-lightning-checkpoint": _unreadable(path) + r"no 'state_dict'",
    }.get(kind, _unreadable(path))
    with pytest.raises(Exception, match=expected):
        _predict(path, requests_file, tmp_path / "out")
    assert built == []


# =================================================================== 5. SLURM auto-resume
def test_slurm_resume_with_only_unreadable_checkpoints_fails_naming_each(tiny_ckpt, tmp_path):
    from mige_cli.slurm import newest_checkpoint

    truncated = _bad_torch_file(tmp_path, "truncated", tiny_ckpt).rename(tmp_path / "hpc_ckpt_2.ckpt")
    empty = _bad_torch_file(tmp_path, "empty", tiny_ckpt).rename(tmp_path / "last.ckpt")
    with pytest.raises(RuntimeError) as err:
        newest_checkpoint([truncated, empty])
    text = str(err.value)
    assert "2 checkpoint(s)" in text and "none can be read" in text
    assert f"{truncated}: not a readable checkpoint" in text and f"{empty}: not a readable checkpoint" in text
    # one readable among them is still chosen (the broken ones are named in the log)
    good = tmp_path / "checkpoints" / "last.ckpt"
    good.parent.mkdir()
    shutil.copy(tiny_ckpt, good)
    assert newest_checkpoint([truncated, empty, good]) == good


# ============================================================================= 6. export
def test_export_refuses_a_non_empty_output_folder_unless_overwrite(
    tiny_ckpt, requests_file, tmp_path, monkeypatch
):
    from mige_cli.export import export_main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--ckpt_path", str(tiny_ckpt), "--output", str(out), "--trainer.logger=false"]
    args += ["--data=datamodules.RequestDataModule", f"--data.requests={requests_file}"]
    with pytest.raises(FileExistsError, match=rf"--output: {re.escape(str(out))} is not empty.*--overwrite"):
        export_main(args)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_main([*args, "--overwrite"])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
