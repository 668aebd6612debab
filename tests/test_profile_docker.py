"""profiles/docker for real: podman stands in for the `docker` command (no Docker engine here),
and the jobs run in the image built from ./Dockerfile.

No container registry is reachable, so the image is built the way the Dockerfile allows for
that: its base is made of Debian's packages (`mmdebstrap --variant=minbase` bookworm with
python3, imported with `podman import`) and passed as BASE_IMAGE; pip installs, without an
index, from a folder of the wheels the host's environment resolves for requirements.lock
(`pip download`: pip's cache or a local mirror after ./setup.sh), passed as PIP_FIND_LINKS.
Then one `snakemake --profile profiles/docker --keep-going` runs the tiny workflow (tiny
random-weight models, a small local corpus) to its report, `hello_dist` under torchrun and
three probe rules, every job in a container of that image. The phases' wall times are printed
(`pytest -s`).

Needs root, podman and mmdebstrap (.ci/services.sh installs them). Without them the tests
skip, saying why, except under CI=true, where they fail: CI cannot pass without running them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import pytest

from .conftest_profiles import REPO, VENV, copy_worktree, unavailable
from .test_workflow import tiny_workspace

DOCKER_JOB = REPO / "profiles" / "docker" / "docker_job.py"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"
[engine]
runtime = "runc"
"""
PROBE = r"""include: "Snakefile"


rule probe:
    output:
        "results/probe/inside.txt",
    shell:
        "{{ hostname; tr '\\0' ' ' < /proc/1/cmdline; echo; command -v python; "
        "python -c 'import refrag, torch; print(refrag.__file__, torch.__version__)'; "
        "ls -a /run; }} > {output}"


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
# What the test builds, in order (each step is one timed phase; the build context is a copy of
# the work tree plus a stray .env and key, which the allow-list .dockerignore must keep out).
BASE = (  # a tar of the root file system on stdout, straight into an image
    "mmdebstrap --quiet --variant=minbase --include=python3,python3-venv bookworm - "
    "| podman import - {base}"
)
WHEELS = (  # the project's dependencies, and setuptools to build it without an index
    "{python} -m pip download --quiet --dest {wheels} -c {context}/requirements.lock "
    "{context} 'setuptools>=68'"
)
BUILD = (
    "podman build --pull=never --layers=false --build-arg BASE_IMAGE={base} "
    "--build-arg GIT_COMMIT={commit} --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1 "
    "--volume {wheels}:/wheels:ro -t {image} {context}"
)
CONTAINER_RULES = {  # every rule of the run but the workflow's localrules (they run on the host)
    "fetch_model", "prepare_corpus", "tokenize", "align_pairs", "heldout_baselines", "train",
    "eval_baselines",
    "eval_refrag", "bench_ttft", "hello_dist", "probe", "fail_in_container", "oom_in_container",
}  # fmt: skip


def timed(phases: dict, name: str, script: str, env: dict, timeout: int) -> None:
    """Run one phase of the build (a bash script), record its wall time, fail with its output."""
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    phases[name] = time.monotonic() - started
    print(f"test_profile_docker: {name}: {phases[name]:.0f} s", flush=True)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """Environment in which `docker` is podman (runc, fixed ulimits, no network for jobs)."""
    podman_bin = shutil.which("podman")
    if podman_bin is None:
        unavailable("podman is not installed (apt-get install podman runc uidmap)")
    if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
        unavailable("building the image's Debian base needs root and mmdebstrap")
    root = tmp_path_factory.mktemp("podman")
    (root / "containers.conf").write_text(CONTAINERS_CONF)
    (root / "bin").mkdir()
    (root / "bin" / "docker").symlink_to(podman_bin)
    return os.environ | {
        "CONTAINERS_CONF": str(root / "containers.conf"),
        "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
    }


@pytest.fixture(scope="module")
def built_image(podman, tmp_path_factory):
    """./Dockerfile built for real (about 9 minutes here, base and wheels included), removed
    afterwards."""
    root = tmp_path_factory.mktemp("dockerfile")
    context = copy_worktree(root / "context")
    (context / ".env").write_text("AWS_SECRET_ACCESS_KEY=must-not-travel\n")
    (context / "id_rsa").write_text("not a key\n")
    tag = uuid.uuid4().hex[:8]
    names = {
        "base": f"localhost/refrag-debian-base:{tag}",
        "image": f"localhost/refrag-workflow:{tag}",
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "wheels": root / "wheels",
        "context": context,
        "python": VENV / "bin" / "python",
    }
    phases: dict[str, float] = {}
    try:
        timed(phases, "debian base (mmdebstrap | podman import)", BASE.format(**names), podman, 900)
        timed(phases, "wheels (pip download)", WHEELS.format(**names), podman, 900)
        timed(phases, "podman build ./Dockerfile", BUILD.format(**names), podman, 1800)
        yield names | {"phases": phases}
    finally:
        subprocess.run(
            ["podman", "rmi", "--force", names["image"], names["base"]],
            capture_output=True,
            env=podman,
        )


@pytest.fixture(scope="module")
def run(podman, built_image, tmp_path_factory, decoder_dir, encoder_dir):
    """One `snakemake --profile profiles/docker --keep-going`, every job in the built image: the
    tiny workflow to its report, hello_dist, a probe, a failing job and one over its mem_mb."""
    root = tmp_path_factory.mktemp("docker")
    runs = [{"decoder": "tiny-decoder", "encoder": "tiny-encoder", "k": [4]}]
    work = tiny_workspace(root, decoder_dir, encoder_dir, runs=runs, windows=32, steps=2)
    (work / "probe.smk").write_text(PROBE)
    mounts = " ".join(f"--volume {root / d}:{root / d}:ro" for d in ("models", "corpus"))
    env = podman | {"REFRAG_DOCKER_IMAGE": built_image["image"], "REFRAG_DOCKER_ARGS": mounts}
    started = time.monotonic()
    proc = subprocess.run(
        [str(VENV / "bin" / "snakemake"), "--snakefile", "probe.smk"]
        + ["--profile", "profiles/docker", "--keep-going", "eval_report", "hello_dist"]
        + ["probe", "fail_in_container", "oom_in_container"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    built_image["phases"]["snakemake --profile docker"] = time.monotonic() - started
    print(f"test_profile_docker: phases (s): {json.dumps(built_image['phases'])}", flush=True)
    leftover = subprocess.run(
        ["docker", "ps", "--all", "--quiet", "--filter", f"label=refrag.workdir={work}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    return work, proc, leftover


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_the_image_holds_the_workflow_stamped_with_its_commit_and_no_secrets(podman, built_image):
    image = built_image["image"]
    inside = subprocess.run(
        ["docker", "run", "--rm", "--pull=never", image, "ls", "-a", "/workflow"],
        capture_output=True,
        text=True,
        env=podman,
        check=True,
    ).stdout.split()
    assert {"Snakefile", "workflow", "refrag", "config", ".image-commit"} <= set(inside)
    assert ".env" not in inside and "id_rsa" not in inside and "tests" not in inside
    fmt = '{{index .Labels "org.opencontainers.image.revision"}}'
    label = subprocess.run(
        ["docker", "inspect", "--format", fmt, image],
        capture_output=True,
        text=True,
        env=podman,
        check=True,
    ).stdout.strip()
    assert label == built_image["commit"]


@pytest.mark.slow
def test_the_tiny_workflow_runs_to_its_report_in_containers_of_the_image(run):
    work, proc, leftover = run
    assert (work / "results/report.html").exists(), output_of(proc)
    assert (work / "results/eval/perplexity.csv").exists()
    assert (work / "results/checkpoints/tiny/tiny-decoder/tiny-encoder/k4/cpt").is_dir()
    logs = sorted((work / ".snakemake/docker/logs").glob("snakejob-*.log"))
    assert {p.name.split("-")[1] for p in logs} == CONTAINER_RULES  # one container per job
    assert leftover == []  # finished containers are removed, their output kept


@pytest.mark.slow
def test_jobs_run_the_images_python_and_refrag(run):
    work, proc, leftover = run
    assert (work / "results/probe/inside.txt").exists(), output_of(proc)
    hostname, pid1, python, imported, *rest = (
        (work / "results/probe/inside.txt").read_text().splitlines()
    )
    assert hostname.startswith("snakejob-probe-")  # the container's own UTS namespace
    assert pid1.startswith("/bin/sh ") and "snakejob.probe" in pid1  # PID 1 is the job script
    assert python == "/opt/venv/bin/python"  # the image's environment, not the host's
    refrag_file, torch_version = imported.split()
    assert refrag_file.startswith("/opt/venv/lib/python3.11/site-packages/refrag/")
    assert torch_version == version("torch")  # from the host's wheels
    assert ".containerenv" in rest  # podman's marker inside every container


@pytest.mark.slow
def test_torchrun_runs_inside_a_container_with_one_log_per_rank(run):
    work, proc, leftover = run
    world = json.loads((work / "results/hello_dist/world.json").read_text())
    assert world["world_size"] == 2 and world["all_reduce_sum"] == world["expected_sum"]
    ranks = sorted((work / "logs/hello_dist/ranks").glob("run-*.log"))
    assert [p.name for p in ranks] == ["run-0.log", "run-1.log"]
    assert all("on snakejob-hello_dist-" in p.read_text() for p in ranks)
    logs = "".join(p.read_text() for p in (work / ".snakemake/docker/logs").glob("*.log"))
    assert "/opt/venv/bin/python -m torch.distributed.run" in logs


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
