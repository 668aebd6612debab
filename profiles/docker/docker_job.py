#!/usr/bin/env python3
"""Run one Snakemake job in a container of the project's image (cluster-generic executor hooks).

    docker_job.py submit JOBSCRIPT   start the job detached, print the container name
    docker_job.py status NAME        print running | success | failed (removes a finished one)
    docker_job.py cancel NAME...     remove running containers

The work tree is bind-mounted at its own path and is the working directory, so the job reads
and writes the same files as on the host, as the invoking user. A job whose rule declares
`resources: gpu=N` gets N GPUs of its own: free devices are claimed under a lock in
.snakemake/docker/ and handed to `docker run --gpus "device=…"` (podman: CDI,
`--device nvidia.com/gpu=…`). `threads` become `--cpus`, a `mem_mb` above 0 `--memory`.
The image is never pulled (`--pull=never`): a missing image or CLI is refused in one line.
A container the engine cannot report on (daemon down) counts as running, for at most
REFRAG_DOCKER_UNREACHABLE_S seconds (default 600), not as a failed job.

Environment (all optional):
  REFRAG_DOCKER          the client command (default: docker; podman works too)
  REFRAG_DOCKER_IMAGE    the image (default: refrag-workflow:latest, built from ./Dockerfile)
  REFRAG_DOCKER_GPUS     host GPU indices jobs may use, e.g. 0,1,2,3 (default: nvidia-smi's)
  REFRAG_DOCKER_SHM      /dev/shm size of each container (default: 16g; NCCL needs it large)
  REFRAG_DOCKER_ARGS     extra `docker run` arguments (shell syntax), e.g. cache mounts
  REFRAG_DOCKER_UNREACHABLE_S  how long a container may stay unreachable (default: 600)
Only the standard library: this runs on the host, in or outside the project's environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

STATE_DIR = Path(".snakemake/docker")  # relative to the work tree (the cwd of snakemake)
PASSED_ENV = ("HF_TOKEN", "HF_ENDPOINT", "WANDB_API_KEY")  # passed by name, never written down


GONE = ("no such container", "no such object", "no container with name or id")


def fail(message: str) -> None:
    raise SystemExit(f"docker_job.py: {message}")


def client() -> list[str]:
    cmd = shlex.split(os.environ.get("REFRAG_DOCKER", "docker"))
    if not shutil.which(cmd[0]):
        fail(f"the container CLI `{cmd[0]}` is not installed (or set REFRAG_DOCKER, e.g. podman)")
    return cmd


def is_podman(cmd: list[str]) -> bool:
    """podman (also behind a `docker` name) takes GPUs as CDI devices, not `--gpus`."""
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True)
    return "podman" in out.stdout.lower()


def gpu_args(cmd: list[str], gpus: list[str]) -> list[str]:
    if not gpus:
        return []
    if is_podman(cmd):
        return [arg for g in gpus for arg in ("--device", f"nvidia.com/gpu={g}")]
    return ["--gpus", f'"device={",".join(gpus)}"']  # docker's CSV syntax needs the quotes


def limit_args(props: dict) -> list[str]:
    """`threads` as --cpus; `mem_mb` (when above 0) as --memory, the container's hard limit."""
    args = ["--cpus", str(max(1, int(props.get("threads") or 1)))]
    mem_mb = int(props.get("resources", {}).get("mem_mb") or 0)
    if mem_mb > 0:
        args += ["--memory", f"{mem_mb}m"]
    return args


def check_image(cmd: list[str], image: str) -> None:
    """One line when the image is missing (it is never pulled) or the engine cannot answer."""
    out = subprocess.run([*cmd, "image", "inspect", image], capture_output=True, text=True)
    if out.returncode == 0:
        return
    error = (out.stderr.strip().splitlines() or ["no answer"])[-1]
    if re.search(r"no such image|image not known|not found", error, re.IGNORECASE):
        fail(f"image {image} not found (never pulled): build it with `docker build -t {image} .`")
    fail(f"the container engine did not answer ({error})")


def job_properties(jobscript: str) -> dict:
    """The `# properties = {…}` line Snakemake writes into every job script."""
    for line in Path(jobscript).read_text().splitlines():
        if line.startswith("# properties = "):
            return json.loads(line.removeprefix("# properties = "))
    raise SystemExit(f"docker_job.py: no properties line in {jobscript}")


def host_gpus() -> list[str]:
    listed = os.environ.get("REFRAG_DOCKER_GPUS")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def is_running(name: str) -> bool:
    out = subprocess.run(
        [*client(), "inspect", "--format", "{{.State.Status}}", name],
        capture_output=True,
        text=True,
    )
    return out.returncode == 0 and out.stdout.strip() in ("created", "running")


def claim_gpus(n: int, name: str, poll_s: float = 5.0) -> list[str]:
    """Claim n free host GPUs for container `name`; wait while other jobs hold them."""
    gpus = host_gpus()
    if n > len(gpus):
        raise SystemExit(
            f"docker_job.py: the job needs {n} GPU(s), this host offers {len(gpus)} "
            f"({','.join(gpus) or 'none'}; set REFRAG_DOCKER_GPUS to list them)"
        )
    claims = STATE_DIR / "gpus"
    claims.mkdir(parents=True, exist_ok=True)
    warned = False
    while True:
        with open(STATE_DIR / "gpus.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            free = [
                g
                for g in gpus
                if not (claims / g).exists() or not is_running((claims / g).read_text().strip())
            ]
            if len(free) >= n:
                for g in free[:n]:
                    (claims / g).write_text(name)
                return free[:n]
        if not warned:
            print(
                f"docker_job.py: waiting for {n} free GPU(s); cap concurrency with "
                f"--resources gpu={len(gpus)}",
                file=sys.stderr,
            )
            warned = True
        time.sleep(poll_s)


def run_command(jobscript: str, props: dict, gpus: list[str], name: str) -> list[str]:
    workdir = os.getcwd()
    engine = client()
    cmd = [*engine, "run", "--detach", "--pull=never", "--name", name, "--hostname", name[:63]]
    cmd += ["--label", f"refrag.workdir={workdir}", "--label", f"refrag.rule={props.get('rule')}"]
    cmd += ["--user", f"{os.getuid()}:{os.getgid()}", "--volume", f"{workdir}:{workdir}"]
    cmd += ["--workdir", workdir, "--shm-size", os.environ.get("REFRAG_DOCKER_SHM", "16g")]
    # HOME: the invoking uid may have no home in the image; PYTHONPATH: the bind-mounted
    # work tree's `refrag` wins over the copy installed in the image.
    cmd += ["--env", "HOME=/tmp", "--env", f"PYTHONPATH={workdir}"]
    cmd += [arg for var in PASSED_ENV if var in os.environ for arg in ("--env", var)]
    cmd += gpu_args(engine, gpus) + limit_args(props)
    cmd += shlex.split(os.environ.get("REFRAG_DOCKER_ARGS", ""))
    return [*cmd, image_name(), "/bin/sh", os.path.abspath(jobscript)]


def image_name() -> str:
    return os.environ.get("REFRAG_DOCKER_IMAGE", "refrag-workflow:latest")


def submit(jobscript: str) -> None:
    props = job_properties(jobscript)
    rule = re.sub(r"[^a-zA-Z0-9_.-]", "_", str(props.get("rule", "job")))
    name = f"snakejob-{rule}-{props.get('jobid', 0)}-{uuid.uuid4().hex[:8]}"
    check_image(client(), image_name())
    gpus = int(props.get("resources", {}).get("gpu", 0) or 0)
    claimed = claim_gpus(gpus, name) if gpus > 0 else []
    started = subprocess.run(
        run_command(jobscript, props, claimed, name),
        stdout=sys.stderr,
        stderr=subprocess.PIPE,
        text=True,
    )
    if started.returncode != 0:  # the engine refused: no job ran; leave nothing behind
        subprocess.run([*client(), "rm", "--force", name], capture_output=True)
        error = (started.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"the container engine could not start {name} (exit {started.returncode}): {error}")
    print(name)


def status(name: str) -> None:
    fmt = "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}} {{.HostConfig.Memory}}"
    out = subprocess.run(
        [*client(), "inspect", "--format", fmt, name], capture_output=True, text=True
    )
    unreachable = STATE_DIR / "unreachable" / name
    if out.returncode != 0:
        error = out.stderr.strip()
        if any(word in error.lower() for word in GONE):
            print(f"docker_job.py: container {name} is gone: {error}", file=sys.stderr)
            print("failed")
            return
        # The engine did not answer: the container may well still run. Not a failed job,
        # unless this lasts (the first such answer is remembered).
        unreachable.parent.mkdir(parents=True, exist_ok=True)
        if not unreachable.exists():
            unreachable.write_text(str(time.time()))
        waited = time.time() - float(unreachable.read_text())
        limit = float(os.environ.get("REFRAG_DOCKER_UNREACHABLE_S", "600"))
        if waited <= limit:
            print(f"docker_job.py: engine error on {name}, still waiting: {error}", file=sys.stderr)
            print("running")
            return
        print(f"docker_job.py: no answer about {name} for {waited:.0f} s: {error}", file=sys.stderr)
        print("failed")
        return
    unreachable.unlink(missing_ok=True)
    state, code, oom, limit = (out.stdout.split() + ["1", "false", "0"])[:4]
    if state in ("created", "running", "restarting", "paused", "configured", "initialized"):
        print("running")
        return
    logs = STATE_DIR / "logs" / f"{name}.log"
    logs.parent.mkdir(parents=True, exist_ok=True)
    with open(logs, "w") as fh:
        subprocess.run([*client(), "logs", name], stdout=fh, stderr=subprocess.STDOUT)
    subprocess.run([*client(), "rm", "--force", name], capture_output=True)
    if code == "0":
        print("success")
        return
    limit_mib = int(limit) // 2**20 if limit.isdigit() else 0
    if oom.lower() == "true":
        why = f"was killed: out of memory (its mem_mb limit, {limit_mib} MiB)"
    elif limit_mib and (code == "137" or killed_in(logs)):
        # The kernel killed a process of the container under its limit (engines such as
        # podman 4.3 do not always set OOMKilled, and a killed child leaves PID 1 exiting 1).
        why = f"was killed: out of memory, most likely (SIGKILL under its {limit_mib} MiB limit)"
    elif code == "137":
        why = "was killed (exit 137, SIGKILL: out of memory, or stopped from outside)"
    else:
        why = f"exited with {code}"
    print(f"docker_job.py: {name} {why}; its output: {logs}", file=sys.stderr)
    print("failed")


def killed_in(logs: Path) -> bool:
    """Whether the container's output ends with a process killed by SIGKILL (the shell's
    "Killed", snakemake's exit status -9/137)."""
    tail = logs.read_text(errors="replace")[-20000:]
    return bool(re.search(r"(^|\s)Killed(\s|$)|exit (status|code) (-9|137)\b", tail, re.MULTILINE))


def cancel(names: list[str]) -> None:
    subprocess.run([*client(), "rm", "--force", *names], capture_output=True)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("submit", "status", "cancel"):
        raise SystemExit(__doc__)
    {"submit": lambda a: submit(a[0]), "status": lambda a: status(a[0]), "cancel": cancel}[argv[0]](
        argv[1:]
    )


if __name__ == "__main__":
    main(sys.argv[1:])
