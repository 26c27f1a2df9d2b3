"""SLURM launch scripts: the per-node command lines, checked with a fake SLURM environment."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "launch" / "slurm"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def fake_path(tmp_path):
    """A fake `scontrol show hostnames` that expands 'gpu[07-08]' style lists like SLURM does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        "#!/bin/bash\n"
        '[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unsupported $*" >&2; exit 1; }\n'
        'case "$3" in\n'
        '  "gpu[07-08]") printf "gpu07\\ngpu08\\n" ;;\n'
        '  "node1") echo node1 ;;\n'
        '  *) echo "fake scontrol: unknown list $3" >&2; exit 1 ;;\n'
        "esac\n")
    scontrol.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def _cmd(function: str, env: dict, fake_path: str, *args: str) -> list[str]:
    script = f'source "{SLURM / "commands.sh"}" && {function} "$@"'
    full_env = {"PATH": fake_path, "HOME": os.environ.get("HOME", "/tmp"), **env}
    proc = subprocess.run(["bash", "-c", script, "_", *args], env=full_env, capture_output=True, text=True,
                          cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


@pytest.mark.parametrize("node", [0, 1])
def test_accelerate_command_per_node(fake_path, node):
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": str(node),
           "SLURM_JOB_ID": "42", "GPUS_PER_NODE": "4", "MAIN_PORT": "29555"}
    cmd = _cmd("dllm2rec_accelerate_cmd", env, fake_path, "--config", "c.yaml", "train.lr=0.01")
    assert cmd[:2] == ["accelerate", "launch"] and "--multi_gpu" in cmd
    assert _opt(cmd, "--num_machines") == "2" and _opt(cmd, "--machine_rank") == str(node)
    assert _opt(cmd, "--num_processes") == "8"  # world size = nodes x GPUs per node
    assert _opt(cmd, "--main_process_ip") == "gpu07" and _opt(cmd, "--main_process_port") == "29555"
    assert _opt(cmd, "--rdzv_backend") == "c10d"
    assert cmd[cmd.index("-m"):] == ["-m", "dllm2rec", "train", "--config", "c.yaml", "train.lr=0.01", "--resume"]


def test_cpu_and_deepspeed_variants(fake_path):
    base = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "1"}
    cpu = _cmd("dllm2rec_accelerate_cmd", {**base, "DEVICE": "cpu"}, fake_path, "--config", "c.yaml")
    assert cpu[:2] == ["env", "ACCELERATE_USE_CPU=1"] and "--multi_gpu" in cpu
    ds = _cmd("dllm2rec_accelerate_cmd", {**base, "ACCELERATE_CONFIG": "launch/accelerate_zero2.yaml"}, fake_path,
              "--config", "c.yaml")
    assert _opt(ds, "--config_file") == "launch/accelerate_zero2.yaml" and "--multi_gpu" not in ds
    assert _opt(ds, "--deepspeed_multinode_launcher") == "standard"


def test_torchrun_command(fake_path):
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "42",
           "GPUS_PER_NODE": "2"}
    cmd = _cmd("dllm2rec_torchrun_cmd", env, fake_path, "--config", "c.yaml")
    assert cmd[0] == "torchrun" and _opt(cmd, "--nnodes") == "2" and _opt(cmd, "--nproc_per_node") == "2"
    assert _opt(cmd, "--rdzv_endpoint") == "gpu07:29500" and _opt(cmd, "--rdzv_id") == "42"
    assert cmd[cmd.index("-m"):] == ["-m", "dllm2rec", "train", "--config", "c.yaml", "--resume"]


def test_array_task_picks_its_line(fake_path, tmp_path):
    runs = tmp_path / "runs.txt"
    runs.write_text("# grid\nlaunch/configs/sasrec_ml100k.yaml train.seed=0\n\n"
                    "launch/configs/sasrec_ml100k.yaml train.seed=1\nlaunch/configs/gru4rec_ml100k.yaml train.output_dir=x\n")
    env = {"RUN_LIST": str(runs), "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"}
    assert _cmd("dllm2rec_array_args", env, fake_path) == [
        "--config", "launch/configs/sasrec_ml100k.yaml", "train.seed=1", "train.output_dir=runs/array/7_1"]
    assert _cmd("dllm2rec_array_args", {**env, "SLURM_ARRAY_TASK_ID": "2"}, fake_path) == [
        "--config", "launch/configs/gru4rec_ml100k.yaml", "train.output_dir=x"]
    proc = subprocess.run(["bash", "-c", f'source "{SLURM / "commands.sh"}" && dllm2rec_array_args'],
                          env={"PATH": fake_path, **env, "SLURM_ARRAY_TASK_ID": "5"}, capture_output=True, text=True)
    assert proc.returncode != 0 and "has no run for array task 5" in proc.stderr


def test_sbatch_scripts_run_srun_per_node(fake_path, tmp_path):
    """Run the sbatch script itself with fake srun/scontrol: srun must get one bash task per node,
    and the command built INSIDE that task must carry that task's machine rank."""
    bin_dir = Path(fake_path.split(":")[0])
    log = tmp_path / "srun.log"
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "while [[ \"$1\" == --* ]]; do shift; done\n"  # drop srun's own options
        f"for node in 0 1; do SLURM_NODEID=$node \"$@\" >> {log} 2>&1; done\n")
    (bin_dir / "srun").chmod(0o755)
    (bin_dir / "accelerate").write_text("#!/bin/bash\necho ACCEL \"$@\"\n")
    (bin_dir / "accelerate").chmod(0o755)
    env = {"PATH": fake_path, "HOME": str(tmp_path), "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
           "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "1", "VENV": str(tmp_path / "novenv")}
    proc = subprocess.run(["bash", str(SLURM / "train_multinode.sbatch"), "--config", "c.yaml"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("ACCEL")]
    assert len(lines) == 2
    assert "--machine_rank 0" in lines[0] and "--machine_rank 1" in lines[1]
    assert all("--main_process_ip gpu07" in ln and ln.endswith("--config c.yaml --resume") for ln in lines)


@pytest.mark.parametrize("script", ["train_multinode.sbatch", "train_array.sbatch", "train_torchrun.sbatch"])
def test_help(script):
    proc = subprocess.run(["bash", str(SLURM / script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "Environment variables" in proc.stdout and "SBATCH" not in proc.stdout
