"""SLURM templates, rendered with sample SLURM variables and stub srun / scontrol / torchrun on PATH that
record their arguments: node count, rendezvous endpoint, ranks per node, node ranks for serve (the
router on the first node), the command and its config; errors before anything starts."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = ["slurm/train.sbatch", "slurm/serve.sbatch", "slurm/launch.sh", "slurm/node.sh"]

STUBS = {
    # scontrol show hostnames LIST -> one host per line
    "scontrol": 'printf "gpu-a\\ngpu-b\\ngpu-c\\n"\n',
    # srun OPTIONS... PROGRAM ARGS...: record, then run the program once per node as SLURM would
    "srun": ('echo "srun $*" >> "$RECORD"\n'
             'while [[ "$1" == -* ]]; do shift; done\n'
             'for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@"; done\n'),
    "torchrun": 'echo "torchrun node=$SLURM_NODEID $*" >> "$RECORD"\n',
}


def _run(tmp_path, template, *args, slurm=True, nodes=2, gpus=4):
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    record = tmp_path / "record.txt"
    record.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", RECORD=str(record), LOG_DIR=str(tmp_path / "logs"),
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    if slurm:
        env.update(SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES=str(nodes), SLURM_GPUS_ON_NODE=str(gpus),
                   SLURM_JOB_NODELIST="gpu-[a-c]", SLURM_SUBMIT_DIR=ROOT)
    proc = subprocess.run(["bash", os.path.join(ROOT, template), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    return proc, record.read_text().splitlines()


def test_train_template_runs_one_agent_per_node_with_c10d_on_the_first(tmp_path):
    proc, lines = _run(tmp_path, "slurm/train.sbatch", os.path.join(ROOT, "launch/tiny.toml"),
                       "--set", "train.steps=3")
    assert proc.returncode == 0, proc.stderr
    assert lines[0].startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1")
    agents = lines[1:]
    assert [a.split()[1] for a in agents] == ["node=0", "node=1"]
    for a in agents:
        assert "--nnodes 2 --nproc-per-node 4" in a
        assert "--rdzv-backend c10d --rdzv-endpoint gpu-a:29500" in a and "--rdzv-id 77" in a
        assert "--max-restarts 3" in a and "-m dist.launch train --config" in a and a.endswith("train.steps=3")


def test_serve_template_puts_rank_zero_on_the_first_node(tmp_path):
    proc, lines = _run(tmp_path, "slurm/serve.sbatch", os.path.join(ROOT, "launch/tiny.toml"), nodes=3, gpus=2)
    assert proc.returncode == 0, proc.stderr
    agents = lines[1:]
    assert len(agents) == 3
    for node, a in enumerate(agents):
        # static node ranks: node N holds global ranks N*2, N*2+1, so rank 0 (the router) is on gpu-a
        assert f"--node-rank {node} --master-addr gpu-a --master-port 29500" in a
        assert "--nnodes 3 --nproc-per-node 2" in a and "-m dist.launch serve" in a


def test_outside_slurm_is_one_clear_line(tmp_path):
    proc, lines = _run(tmp_path, "slurm/train.sbatch", "launch/tiny.toml", slurm=False)
    assert proc.returncode == 2 and lines == []
    assert proc.stderr.strip().count("\n") == 0 and "not inside a SLURM job" in proc.stderr


@pytest.mark.parametrize("sp,why", [(3, "must divide the world size"), (4, "GPUs per node")])
def test_sp_degree_that_does_not_fit_the_nodes_stops_before_start(tmp_path, sp, why):
    # 2 nodes x 6 GPUs: sp 3 fits; here with 2 x 2 GPUs sp 3 does not divide 4, and with 3 nodes x 6 GPUs
    # sp 4 divides neither 6 nor a multiple of it
    nodes, gpus = (2, 2) if sp == 3 else (2, 6)
    proc, lines = _run(tmp_path, "slurm/train.sbatch", os.path.join(ROOT, "launch/tiny.toml"),
                       "--set", f"sp.degree={sp}", nodes=nodes, gpus=gpus)
    assert proc.returncode != 0 and lines == [], proc.stderr
    assert why in proc.stderr and "sp.degree" in proc.stderr


@pytest.mark.parametrize("path", TEMPLATES)
def test_templates_parse(path):
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, path)]).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", os.path.join(ROOT, path)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout
