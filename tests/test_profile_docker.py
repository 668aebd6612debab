"""profiles/docker for real: podman stands in for the `docker` command (no Docker engine here).

The image is built without any registry: a root file system holding only the host libraries
that bash, coreutils and the project's Python need, imported with `podman import`; the Python
install and the project's venv are bind-mounted read-only (REFRAG_DOCKER_ARGS), where the
user-facing image (./Dockerfile) has them installed. Everything else is the profile as a user
runs it: `snakemake --profile docker`, cluster-generic, profiles/docker/docker_job.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest_profiles import REPO, VENV, copy_worktree

DOCKER_JOB = REPO / "profiles" / "docker" / "docker_job.py"
PYTHON_HOME = Path(sys.base_prefix)
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"
[engine]
runtime = "runc"
"""
TOOLS = (  # noqa: SIM905
    "bash sh env cat touch mkdir rm ls id sleep true false echo test hostname readlink dirname "
    "basename mktemp uname chmod cp mv ln head tail wc grep sed tr sort tee date"
).split()
PROBE = r"""include: "Snakefile"


rule probe:
    output:
        "results/probe/inside.txt",
    shell:
        "{{ hostname; tr '\\0' ' ' < /proc/1/cmdline; echo; ls -a /run; id -u; }} > {output}"


rule fail_in_container:
    output:
        "results/probe/fail.txt",
    shell:
        "touch {output}.started && exit 3"
"""


def build_rootfs(rootfs: Path) -> None:
    """bash, coreutils and the shared libraries of them, of Python and of the venv's modules."""
    for d in (
        "usr/bin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "tmp",
        "proc",
        "sys",
        "dev",
        "run",
        "root",
        "home",
    ):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin"):
        (rootfs / link).symlink_to("usr/bin")
    for link in ("lib", "lib64"):
        (rootfs / link).symlink_to(f"usr/{link}")
    (rootfs / "tmp").chmod(0o1777)
    for tool in TOOLS:
        if found := shutil.which(tool, path="/usr/bin:/bin"):
            shutil.copy(found, rootfs / "usr/bin" / tool)
    binaries = [str(p) for p in (rootfs / "usr/bin").iterdir()]
    binaries.append(os.path.realpath(PYTHON_HOME / "bin" / "python3"))
    for base in (PYTHON_HOME / "lib", VENV / "lib"):
        binaries += [str(p) for p in base.rglob("*.so*") if p.is_file()]
    libs = set()
    for i in range(0, len(binaries), 200):
        out = subprocess.run(["ldd", *binaries[i : i + 200]], capture_output=True, text=True)
        libs |= {w for w in out.stdout.split() if w.startswith("/") and not w.endswith(":")}
    for lib in sorted(libs):
        if lib.startswith((str(PYTHON_HOME), str(VENV))) or not os.path.exists(lib):
            continue
        target = rootfs / Path(lib).relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy(os.path.realpath(lib), target)
    (rootfs / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nrefrag:x:1000:1000::/home/refrag:/bin/bash\n"
    )
    (rootfs / "etc/group").write_text("root:x:0:\nrefrag:x:1000:\n")


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """Environment in which `docker` is podman, with an image of the host's Python stack."""
    podman_bin = shutil.which("podman")
    if podman_bin is None:
        pytest.skip("podman is not installed (CI installs it: bash .ci/services.sh)")
    root = tmp_path_factory.mktemp("podman")
    (root / "containers.conf").write_text(CONTAINERS_CONF)
    (root / "bin").mkdir()
    (root / "bin" / "docker").symlink_to(podman_bin)
    env = os.environ | {
        "CONTAINERS_CONF": str(root / "containers.conf"),
        "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
    }
    build_rootfs(root / "rootfs")
    image = f"localhost/refrag-profile-test:{uuid.uuid4().hex[:8]}"
    tar = subprocess.Popen(["tar", "-C", str(root / "rootfs"), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["podman", "import", "--change", f"ENV=PATH={VENV / 'bin'}:/usr/bin", "-", image],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        env=env,
    )
    tar.wait()
    if imported.returncode != 0:
        pytest.skip(f"podman cannot import an image here: {imported.stderr.strip()[-500:]}")
    probe = subprocess.run(
        ["docker", "run", "--rm", image, "true"], capture_output=True, text=True, env=env
    )
    if probe.returncode != 0:
        subprocess.run(["podman", "rmi", "--force", image], capture_output=True, env=env)
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-500:]}")
    env |= {
        "REFRAG_DOCKER_IMAGE": image,
        "REFRAG_DOCKER_ARGS": f"--volume {PYTHON_HOME}:{PYTHON_HOME}:ro --volume {VENV}:{VENV}:ro",
    }
    yield env
    subprocess.run(["podman", "rmi", "--force", image], capture_output=True, env=env)


@pytest.fixture(scope="module")
def run(podman, tmp_path_factory):
    """One `snakemake --profile docker --keep-going` of two good jobs and a failing one."""
    work = copy_worktree(tmp_path_factory.mktemp("docker") / "work")
    (work / "probe.smk").write_text(PROBE)
    proc = subprocess.run(
        [
            str(VENV / "bin" / "snakemake"),
            "--snakefile",
            "probe.smk",
            "--profile",
            "docker",
            "--keep-going",
            "hello_dist",
            "probe",
            "fail_in_container",
        ],
        cwd=work,
        env=podman,
        capture_output=True,
        text=True,
        timeout=600,
    )
    leftover = subprocess.run(
        ["docker", "ps", "--all", "--quiet", "--filter", f"label=refrag.workdir={work}"],
        capture_output=True,
        text=True,
        env=podman,
        check=True,
    ).stdout.split()
    return work, proc, leftover


@pytest.mark.slow
def test_jobs_run_inside_containers_of_the_image(run):
    work, proc, leftover = run
    assert (work / "results/probe/inside.txt").exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    hostname, pid1, *rest = (work / "results/probe/inside.txt").read_text().splitlines()
    assert hostname.startswith("snakejob-probe-")  # the container's own UTS namespace
    assert pid1.startswith("/bin/sh ") and "snakejob.probe" in pid1  # PID 1 is the job script
    assert ".containerenv" in rest  # podman's marker inside every container
    world = json.loads((work / "results/hello_dist/world.json").read_text())
    assert world["world_size"] == 2 and world["all_reduce_sum"] == world["expected_sum"]
    ranks = sorted((work / "logs/hello_dist/ranks").glob("run-*.log"))
    assert len(ranks) == 2
    assert all("on snakejob-hello_dist-" in p.read_text() for p in ranks)  # torchrun inside
    assert leftover == []  # finished containers are removed, their output kept
    assert len(list((work / ".snakemake/docker/logs").glob("snakejob-*.log"))) == 3


@pytest.mark.slow
def test_a_failing_job_fails_the_run(run):
    work, proc, leftover = run
    assert proc.returncode != 0
    assert (work / "results/probe/fail.txt.started").exists()  # it did run, and failed
    assert not (work / "results/probe/fail.txt").exists()
    assert "snakejob-fail_in_container-" in proc.stderr and "exited with" in proc.stderr
    assert "Error in rule fail_in_container" in proc.stderr
    assert leftover == []


def fake_docker(tmp_path: Path) -> Path:
    """A `docker` that records its arguments and calls every container running."""
    script = tmp_path / "docker"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\ncase "$1" in inspect) echo running;; esac\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def submit(tmp_path: Path, gpus: int, env: dict) -> subprocess.CompletedProcess:
    props = {"rule": "train", "jobid": gpus, "resources": {"gpu": gpus}, "threads": 1}
    jobscript = tmp_path / f"job{gpus}.sh"
    jobscript.write_text(f"#!/bin/sh\n# properties = {json.dumps(props)}\ntrue\n")
    return subprocess.run(
        [sys.executable, str(DOCKER_JOB), "submit", str(jobscript)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_gpu_jobs_get_distinct_devices_and_an_oversized_one_is_refused(tmp_path):
    env = os.environ | {"REFRAG_DOCKER": str(fake_docker(tmp_path)), "REFRAG_DOCKER_GPUS": "0,1,2"}
    assert submit(tmp_path, 2, env).returncode == 0
    assert submit(tmp_path, 1, env).returncode == 0
    assert submit(tmp_path, 0, env).returncode == 0
    runs = [
        line for line in (tmp_path / "calls").read_text().splitlines() if line.startswith("run ")
    ]
    assert '--gpus "device=0,1"' in runs[0]
    assert '--gpus "device=2"' in runs[1]
    assert "--gpus" not in runs[2]
    assert all("--shm-size 16g" in r and f"--volume {tmp_path}:{tmp_path}" in r for r in runs)
    refused = submit(tmp_path, 4, env)
    assert refused.returncode != 0 and "needs 4 GPU(s), this host offers 3" in refused.stderr
