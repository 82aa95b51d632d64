"""SLURM: the job's run directory survives a requeue, resume picks the newest checkpoint, and a
simulated 2-task job (the environment ``srun`` sets, a fake ``scontrol``) answers SIGUSR1 with a
checkpoint and a requeue request, then its next start resumes from that checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import Namespace

from callbacks.slurm_requeue import next_hpc_checkpoint, slurm_job_id
from mige_cli.slurm import newest_checkpoint, use_job_run_dir
from tests.helpers.fsdp_probe import cli_env, fit_command, write_overlay
from tests.helpers.processes import free_port

REPO = Path(__file__).resolve().parents[1]
JOB = "4242"
FIT = {"accumulate_grad_batches": 2}  # the signal may come between micro-batches: act after the step


def slurm_env(monkeypatch, **extra) -> None:
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mige", "SLURM_JOB_ID": JOB, **extra}.items():
        monkeypatch.setenv(key, value)


def trainer_config(version=None, root=None) -> Namespace:
    logger = Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir="runs", name="demo", version=version),
    )
    return Namespace(logger=logger, default_root_dir=root)


def test_run_directory_is_named_after_the_job(monkeypatch):
    for key in ("SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    cfg = trainer_config()
    assert use_job_run_dir(cfg) is None and cfg.logger.init_args.version is None  # not under SLURM
    slurm_env(monkeypatch)
    assert use_job_run_dir(cfg) == f"runs/demo/slurm_{JOB}"
    assert cfg.logger.init_args.version == f"slurm_{JOB}" and cfg.default_root_dir == f"runs/demo/slurm_{JOB}"
    explicit = trainer_config(version="mine", root="elsewhere")  # a config's own choice stays
    use_job_run_dir(explicit)
    assert explicit.logger.init_args.version == "mine" and explicit.default_root_dir == "elsewhere"
    slurm_env(monkeypatch, SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="3")
    assert slurm_job_id() == "77_3"
    slurm_env(monkeypatch, SLURM_JOB_NAME="interactive")  # `srun --pty bash`-style sessions: not a job
    assert use_job_run_dir(trainer_config()) is None


def _fake_checkpoint(path: Path, step: int, *, sharded: bool = True) -> Path:
    if sharded:
        path.mkdir(parents=True)
        torch.save({"global_step": step}, path / "meta.pt")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": step, "state_dict": {}}, path)
    return path


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for ``os.system`` in a crafted file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_checkpoints_are_refused_without_running_their_code(tmp_path, caplog):
    """Auto-resume scans the run folder for any hpc_ckpt_* / last*.ckpt: a file planted there that
    needs arbitrary unpickling must be skipped (named in the log) and its code never run; export
    refuses it with an error naming the file."""
    from mige_cli.export import read_checkpoint
    from mige_lightning.checkpoint_state import load_checkpoint_file

    marker = tmp_path / "code_ran"
    good = _fake_checkpoint(tmp_path / "checkpoints/last.ckpt", 10)
    planted = tmp_path / "hpc_ckpt_9.ckpt"
    torch.save({"global_step": 999, "payload": _RunsCode(marker)}, planted)
    sharded = tmp_path / "hpc_ckpt_8.ckpt"
    sharded.mkdir()
    torch.save({"global_step": 998, "payload": _RunsCode(marker)}, sharded / "meta.pt")
    with caplog.at_level("WARNING"):
        assert newest_checkpoint([good, planted, sharded]) == good
    assert not marker.exists()
    assert f"ignoring unreadable checkpoint {planted}" in caplog.text and "refusing to load" in caplog.text
    with pytest.raises(ValueError, match=r"hpc_ckpt_9\.ckpt: refusing to load"):
        load_checkpoint_file(planted)
    with pytest.raises(ValueError, match=r"meta\.pt: refusing to load"):
        read_checkpoint(SimpleNamespace(named_parameters=list), sharded)  # meta.pt comes first
    assert not marker.exists()


def test_resume_picks_the_highest_step_and_skips_a_broken_checkpoint(tmp_path):
    last = _fake_checkpoint(tmp_path / "checkpoints/last.ckpt", 120)
    hpc1 = _fake_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 100)
    assert newest_checkpoint([last, hpc1]) == last  # a later periodic checkpoint beats an old pre-emption
    hpc2 = _fake_checkpoint(tmp_path / "hpc_ckpt_2.ckpt", 120)
    assert newest_checkpoint([last, hpc1, hpc2]) == hpc2  # same step: the pre-emption checkpoint
    broken = tmp_path / "hpc_ckpt_3.ckpt"
    broken.mkdir()  # cut short: no meta.pt
    assert newest_checkpoint([last, hpc2, broken]) == hpc2
    single = _fake_checkpoint(tmp_path / "other/last.ckpt", 130, sharded=False)
    assert newest_checkpoint([hpc2, single]) == single
    assert newest_checkpoint([]) is None
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_4.ckpt"


def _srun(overlay: Path, cwd: Path, tag: str) -> list[subprocess.Popen]:
    """Start the 2 tasks of a one-node job the way srun does: same command, SLURM_PROCID per task."""
    procs, port = [], free_port()
    for rank in range(2):
        env = cli_env(
            PATH=f"{cwd / 'bin'}:{cli_env()['PATH']}",
            SLURM_JOB_ID=JOB,
            SLURM_JOB_NAME="mige-test",
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="2",
            SLURM_NNODES="1",
            SLURM_NODEID="0",
            SLURM_NODELIST="localhost",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        log = (cwd / f"{tag}-task{rank}.log").open("w")
        procs.append(
            subprocess.Popen(fit_command(overlay), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    return procs


def _wait(procs: list[subprocess.Popen], cwd: Path, tag: str, timeout: float = 300) -> None:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(cwd.glob(f"{tag}-task*.log")))
    assert codes == [0, 0], logs


def _wait_for_training(procs: list[subprocess.Popen], run_dir: Path) -> None:
    """Until both tasks are training (their first periodic checkpoint exists)."""
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints/last.ckpt/meta.pt").is_file():
        assert all(p.poll() is None for p in procs), "a task exited before training"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.5)


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_the_next_start_resumes(tmp_path):
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin/scontrol"  # stands in for SLURM's: records what it was asked
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    scontrol.chmod(0o755)
    run_dir = tmp_path / "runs/demo" / f"slurm_{JOB}"
    first = write_overlay(
        tmp_path / "first.yaml",
        world=tmp_path / "world",
        probe=tmp_path / "probe1",
        every=2,
        **{**FIT, "max_steps": 1000},
    )
    procs = _srun(first, tmp_path, "first")
    _wait_for_training(procs, run_dir)
    for p in procs:  # what SLURM does 90 s before the end (--signal=SIGUSR1@90)
        p.send_signal(signal.SIGUSR1)
    _wait(procs, tmp_path, "first")

    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB}\n"  # once, from rank 0
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    step = torch.load(hpc / "meta.pt", weights_only=True)["global_step"]
    assert 2 <= step < 1000
    for rank in range(2):
        rows = json.loads((tmp_path / "probe1" / f"rank{rank}.json").read_text())["rows"]
        # stopped right after the pre-emption checkpoint, which came after an optimiser step
        assert rows[-1]["step"] == step and len(rows) == 2 * step

    # the requeued job: same id, no --ckpt_path, two more steps
    second = write_overlay(
        tmp_path / "second.yaml",
        world=tmp_path / "world",
        probe=tmp_path / "probe2",
        every=2,
        **{**FIT, "max_steps": step + 2},
    )
    _wait(_srun(second, tmp_path, "second"), tmp_path, "second")
    log = (tmp_path / "second-task0.log").read_text()
    assert f"resuming from {hpc.relative_to(tmp_path)}" in log and "Restored all states" in log
    for rank in range(2):
        rows = json.loads((tmp_path / "probe2" / f"rank{rank}.json").read_text())["rows"]
        assert [r["step"] for r in rows] == [step, step + 1, step + 1, step + 2]  # 2 micro-batches a step
    assert [p.name for p in (tmp_path / "runs/demo").iterdir()] == [f"slurm_{JOB}"]  # no new version
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # one per start, same directory
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = [s.step for s in events.Scalars("train/loss")]
    assert logged == list(range(step + 2))  # continuous, no step logged twice


def test_ckpt_path_last_finds_the_newest_checkpoint_of_the_run_or_fails_clearly(tmp_path, monkeypatch):
    """Lightning resolves 'last' only inside the new run's own (empty) folder, so `fit --ckpt_path
    last` silently started from step 0. It now means the highest-step last*.ckpt / hpc_ckpt_* of
    any version of the run the logger names."""
    from mige_cli.cli import last_checkpoint_of_run
    from mige_cli.main import main

    monkeypatch.chdir(tmp_path)
    trainer = {"logger": {"class_path": "x", "init_args": {"save_dir": "runs", "name": "demo"}}}
    with pytest.raises(
        FileNotFoundError, match=r"no last\*\.ckpt or hpc_ckpt_\*\.ckpt in any version of runs/demo"
    ):
        last_checkpoint_of_run(trainer)
    _fake_checkpoint(tmp_path / "runs/demo/version_0/checkpoints/last.ckpt", 700, sharded=False)
    newest = _fake_checkpoint(tmp_path / "runs/demo/version_1/checkpoints/last.ckpt", 900, sharded=False)
    _fake_checkpoint(tmp_path / "runs/other/version_0/checkpoints/last.ckpt", 5000, sharded=False)
    assert last_checkpoint_of_run(trainer) == Path("runs/demo/version_1/checkpoints/last.ckpt")
    assert newest.is_file()
    # through the CLI: no run folder → the error, before anything is built or trained
    with pytest.raises(FileNotFoundError, match="--ckpt_path last"):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs/demo.yaml"),
                "--trainer.logger.init_args.name=none",
                "--ckpt_path",
                "last",
            ]
        )


def test_submit_script_quotes_values_with_shell_characters(tmp_path):
    """EXTRA_ARGS / PYTHON holding '&', '|', ';' or spaces used to break the sed template or run as
    shell syntax in the job; now every value reaches `fit` as the literal word it was."""
    env = {
        **cli_env(),
        "EXTRA_ARGS": "--data.root=/a&b --model.init_weights=x|y;z",
        "PYTHON": "/opt/my env/python",
        "JOB_NAME": "a|b&c",
    }
    script = subprocess.run(
        ["bash", str(REPO / "scripts/slurm/submit.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "#SBATCH --job-name=a|b&c" in script
    # run the job script's srun line with srun replaced by printing its arguments, one per line
    srun = script[script.index("srun ") :].replace("srun --kill-on-bad-exit=1", "printf '%s\\n'", 1)
    slurm = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NTASKS": "2"}
    args = subprocess.run(
        ["bash", "-c", srun], env={**env, **slurm}, capture_output=True, text=True, check=True
    )
    words = args.stdout.splitlines()
    assert words[0] == "/opt/my env/python"
    assert words[-2:] == ["--data.root=/a&b", "--model.init_weights=x|y;z"]
    assert "--trainer.strategy.init_args.data_parallel_size=2" in words


def test_a_new_run_into_a_taken_explicit_version_is_refused(tmp_path, monkeypatch):
    from mige_cli.main import main

    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "runs/demo/version_3"
    taken.mkdir(parents=True)
    (taken / "events.out.tfevents.1").write_text("x")
    args = ["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.logger.init_args.version=3"]
    with pytest.raises(
        FileExistsError, match=r"runs/demo/version_3 already holds a run \(logger version 3\)"
    ):
        main(args)
    assert sorted(p.name for p in taken.iterdir()) == ["events.out.tfevents.1"]  # nothing written into it


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_on_both_and_exits_143_without_requeue(tmp_path):
    """scancel, a job's end or a container stop send SIGTERM. Lightning's own handler broadcasts
    from inside the signal handler, so a SIGTERM that reaches one rank of two hung both; and a
    single process exited 0 with no checkpoint. Now: the next step ends with a checkpoint taken by
    both ranks together, no requeue, and exit code 143 on both."""
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin/scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    scontrol.chmod(0o755)
    run_dir = tmp_path / "runs/demo" / f"slurm_{JOB}"
    overlay = write_overlay(
        tmp_path / "term.yaml", world=tmp_path / "world", probe=tmp_path / "probe", every=2, max_steps=1000
    )
    procs = _srun(overlay, tmp_path, "term")
    _wait_for_training(procs, run_dir)
    procs[1].send_signal(signal.SIGTERM)  # one rank only
    try:
        codes = [p.wait(timeout=120) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError("a rank hung after SIGTERM to the other") from None
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("term-task*.log")))
    assert codes == [143, 143], logs
    assert not (tmp_path / "scontrol.log").exists()  # a terminated job is not requeued
    step = torch.load(run_dir / "hpc_ckpt_1.ckpt" / "meta.pt", weights_only=True)["global_step"]
    for rank in range(2):
        rows = json.loads((tmp_path / "probe" / f"rank{rank}.json").read_text())["rows"]
        assert rows[-1]["step"] == step  # stopped right after the SIGTERM checkpoint
    assert "SIGTERM: saving" in (tmp_path / "term-task0.log").read_text()


def test_sigterm_in_a_single_process_run_checkpoints_after_the_step_and_sets_exit_code_143(tmp_path):
    import os

    from callbacks.slurm_requeue import PreemptionCheckpoint
    from tests.helpers.training import LinearModule, bare_trainer

    class SelfTerminating(LinearModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step
            return super().training_step(batch, batch_idx)

    callback = PreemptionCheckpoint()
    trainer = bare_trainer(tmp_path, max_steps=20, callbacks=[callback])
    previous = signal.getsignal(signal.SIGTERM)
    trainer.fit(SelfTerminating())
    assert trainer.global_step == 4 and callback.exit_code == 143
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored after the run
