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
TOOLS = (  # noqa: SIM905 (`which`: the Slurm executor plugin calls it whenever Snakemake starts)
    "bash sh env cat touch mkdir rm ls id sleep true false echo test hostname readlink dirname "
    "basename mktemp uname chmod cp mv ln head tail wc grep sed tr sort tee date which"
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


rule oom_in_container:
    output:
        "results/probe/oom.txt",
    resources:
        mem_mb=64,
    shell:
        "python -c 'bytearray(512 * 2**20)' && touch {output}"
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
            "oom_in_container",
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
    assert len(list((work / ".snakemake/docker/logs").glob("snakejob-*.log"))) == 4


@pytest.mark.slow
def test_mem_mb_is_the_containers_memory_limit(run):
    work, proc, leftover = run
    assert not (work / "results/probe/oom.txt").exists()
    oom = [line for line in proc.stderr.splitlines() if "snakejob-oom_in_container-" in line]
    assert any("out of memory" in line for line in oom), proc.stderr[-3000:]


@pytest.mark.slow
def test_a_failing_job_fails_the_run(run):
    work, proc, leftover = run
    assert proc.returncode != 0
    assert (work / "results/probe/fail.txt.started").exists()  # it did run, and failed
    assert not (work / "results/probe/fail.txt").exists()
    assert "snakejob-fail_in_container-" in proc.stderr and "exited with" in proc.stderr
    assert "Error in rule fail_in_container" in proc.stderr
    assert leftover == []


def fake_docker(tmp_path: Path, version: str = "Docker version 28.2.2", inspect: str = "") -> Path:
    """A `docker` that records its arguments; `inspect` is the shell code answering inspect."""
    script = tmp_path / "docker"
    script.write_text(
        f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
case "$1" in
  --version) echo "{version}";;
  inspect) {inspect or "echo running"};;
esac
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def submit(
    tmp_path: Path, gpus: int, env: dict, threads: int = 1, mem_mb: int = 0
) -> subprocess.CompletedProcess:
    props = {
        "rule": "train",
        "jobid": gpus,
        "resources": {"gpu": gpus, "mem_mb": mem_mb},
        "threads": threads,
    }
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


def status(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DOCKER_JOB), "status", "snakejob-x"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def run_calls(tmp_path: Path) -> list[str]:
    calls = (tmp_path / "calls").read_text().splitlines()
    return [line for line in calls if line.startswith("run ")]


def test_gpu_jobs_get_distinct_devices_and_an_oversized_one_is_refused(tmp_path):
    env = os.environ | {"REFRAG_DOCKER": str(fake_docker(tmp_path)), "REFRAG_DOCKER_GPUS": "0,1,2"}
    assert submit(tmp_path, 2, env).returncode == 0
    assert submit(tmp_path, 1, env).returncode == 0
    assert submit(tmp_path, 0, env).returncode == 0
    runs = run_calls(tmp_path)
    assert '--gpus "device=0,1"' in runs[0]
    assert '--gpus "device=2"' in runs[1]
    assert "--gpus" not in runs[2]
    assert all("--shm-size 16g" in r and f"--volume {tmp_path}:{tmp_path}" in r for r in runs)
    assert all("--pull=never" in r for r in runs)  # a missing image is never pulled
    refused = submit(tmp_path, 4, env)
    assert refused.returncode != 0 and "needs 4 GPU(s), this host offers 3" in refused.stderr


def test_podman_gets_gpus_as_cdi_devices(tmp_path):
    docker = fake_docker(tmp_path, version="podman version 4.3.1")
    env = os.environ | {"REFRAG_DOCKER": str(docker), "REFRAG_DOCKER_GPUS": "0,1,2"}
    assert submit(tmp_path, 2, env).returncode == 0
    (run,) = run_calls(tmp_path)
    assert "--device nvidia.com/gpu=0 --device nvidia.com/gpu=1" in run
    assert "--gpus" not in run


def test_threads_and_mem_mb_become_cpu_and_memory_limits(tmp_path):
    env = os.environ | {"REFRAG_DOCKER": str(fake_docker(tmp_path))}
    assert submit(tmp_path, 0, env, threads=3, mem_mb=3000).returncode == 0
    (run,) = run_calls(tmp_path)
    assert "--cpus 3 --memory 3000m" in run


def test_a_missing_image_is_refused_in_one_line(tmp_path):
    docker = fake_docker(tmp_path)
    docker.write_text(
        docker.read_text().replace(
            "esac",
            '  image) echo "Error: refrag-workflow:latest: image not known" >&2; exit 1;;\nesac',
        )
    )
    proc = submit(tmp_path, 0, os.environ | {"REFRAG_DOCKER": str(docker)})
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "docker_job.py: image refrag-workflow:latest not found (never pulled): "
        "build it with `docker build -t refrag-workflow:latest .`"
    )
    assert run_calls(tmp_path) == []


def test_a_missing_cli_is_refused_in_one_line(tmp_path):
    proc = submit(tmp_path, 0, os.environ | {"REFRAG_DOCKER": str(tmp_path / "no-docker")})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"docker_job.py: the container CLI `{tmp_path / 'no-docker'}` is not installed "
        "(or set REFRAG_DOCKER, e.g. podman)"
    ]


def test_an_engine_error_is_not_a_failed_job_until_it_lasts(tmp_path):
    down = 'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock" >&2; exit 1'
    env = os.environ | {"REFRAG_DOCKER": str(fake_docker(tmp_path, inspect=down))}
    waiting = status(tmp_path, env)
    assert waiting.stdout.strip() == "running" and "still waiting" in waiting.stderr
    given_up = status(tmp_path, env | {"REFRAG_DOCKER_UNREACHABLE_S": "0"})
    assert given_up.stdout.strip() == "failed" and "no answer about snakejob-x" in given_up.stderr
    gone = 'echo "Error: no such container snakejob-x" >&2; exit 1'
    env = os.environ | {"REFRAG_DOCKER": str(fake_docker(tmp_path, inspect=gone))}
    assert status(tmp_path, env).stdout.strip() == "failed"


def test_a_process_killed_under_the_memory_limit_is_named_as_oom(tmp_path):
    inspect = "echo exited 1 false 67108864"  # podman: no OOMKilled, PID 1 exits 1
    docker = fake_docker(tmp_path, inspect=inspect)
    docker.write_text(
        docker.read_text().replace(
            "esac", '  logs) echo "/bin/sh: line 1:   7 Killed   python";;\nesac'
        )
    )
    proc = status(tmp_path, os.environ | {"REFRAG_DOCKER": str(docker)})
    assert proc.stdout.strip() == "failed"
    assert "was killed: out of memory, most likely (SIGKILL under its 64 MiB limit)" in proc.stderr


def test_an_oom_kill_is_named_as_such(tmp_path):
    env = os.environ | {"REFRAG_DOCKER": str(fake_docker(tmp_path, inspect="echo exited 137 true"))}
    proc = status(tmp_path, env)
    assert proc.stdout.strip() == "failed"
    assert "was killed: out of memory" in proc.stderr


BUILD_STEPS = """\
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm {rootfs}
tar -C {rootfs} -c . | podman import - {base}
podman build --build-arg BASE_IMAGE={base} --build-arg GIT_COMMIT={commit} \\
    --build-arg PIP_FIND_LINKS=/wheels --volume {wheels}:/wheels:ro \\
    --build-arg PIP_CERT=/host-ca.crt --volume {ca}:/host-ca.crt:ro -t {image} {context}
"""


@pytest.fixture(scope="module")
def built_image(podman, tmp_path_factory):
    """./Dockerfile built for real, from a Debian base made by debootstrap (no registry).

    About 10 minutes and 2.4 GB here, so only with REFRAG_TEST_DOCKERFILE=1 (the README's
    backends table). The context is a copy of the work tree plus a stray .env and key, which
    the allow-list .dockerignore must keep out. PyPI's torch==2.13.0 is a CUDA build of several
    GB: a folder of wheels holding a CPU build (REFRAG_TEST_WHEELS, default /opt/wheels) is
    mounted and passed as PIP_FIND_LINKS; the host's CA bundle as PIP_CERT (TLS-inspecting
    proxies)."""
    if os.environ.get("REFRAG_TEST_DOCKERFILE") != "1":
        pytest.skip("set REFRAG_TEST_DOCKERFILE=1 to build ./Dockerfile (about 10 min)")
    if not shutil.which("debootstrap"):
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    root = tmp_path_factory.mktemp("dockerfile")
    context = copy_worktree(root / "context")
    (context / ".env").write_text("AWS_SECRET_ACCESS_KEY=must-not-travel\n")
    (context / "id_rsa").write_text("not a key\n")
    tag = uuid.uuid4().hex[:8]
    base, image = f"localhost/refrag-debian-base:{tag}", f"localhost/refrag-workflow:{tag}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    script = BUILD_STEPS.format(
        rootfs=root / "rootfs",
        base=base,
        commit=commit,
        wheels=os.environ.get("REFRAG_TEST_WHEELS", "/opt/wheels"),
        ca="/etc/ssl/certs/ca-certificates.crt",
        image=image,
        context=context,
    )
    built = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=podman,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    yield {"image": image, "commit": commit}
    subprocess.run(["podman", "rmi", "--force", image, base], capture_output=True, env=podman)


@pytest.mark.slow
def test_the_dockerfile_image_runs_the_workflows_jobs(podman, built_image, tmp_path):
    env = podman | {"REFRAG_DOCKER_IMAGE": built_image["image"], "REFRAG_DOCKER_ARGS": ""}
    inside = subprocess.run(
        ["docker", "run", "--rm", "--pull=never", built_image["image"], "ls", "-a", "/workflow"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    assert "Snakefile" in inside and "refrag" in inside
    assert ".env" not in inside and "id_rsa" not in inside and "tests" not in inside
    label = subprocess.run(
        [
            "docker",
            "inspect",
            "--format",
            '{{index .Labels "org.opencontainers.image.revision"}}',
            built_image["image"],
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    assert label == built_image["commit"]
    work = copy_worktree(tmp_path / "work")
    proc = subprocess.run(
        [str(VENV / "bin" / "snakemake"), "--profile", "docker", "hello_dist"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = (work / "logs/hello_dist/ranks/run-0.log").read_text()
    assert "hello from rank 0/2 on snakejob-hello_dist-" in rank0
    logs = "".join(p.read_text() for p in (work / ".snakemake/docker/logs").glob("*.log"))
    assert "/opt/venv/bin/python -m torch.distributed.run" in logs  # the image's Python
