#!/usr/bin/env python3
"""Run one Snakemake job in a container of the project's image (cluster-generic executor hooks).

    docker_job.py submit JOBSCRIPT   start the job detached, print the container name
    docker_job.py status NAME        print running | success | failed (removes a finished one)
    docker_job.py cancel NAME...     remove running containers

The work tree is bind-mounted at its own path and is the working directory, so the job reads
and writes the same files as on the host, as the invoking user. A job whose rule declares
`resources: gpu=N` gets N GPUs of its own: free devices are claimed under a lock in
.snakemake/docker/ and handed to `docker run --gpus "device=…"`.

Environment (all optional):
  REFRAG_DOCKER          the client command (default: docker; podman works too)
  REFRAG_DOCKER_IMAGE    the image (default: refrag-workflow:latest, built from ./Dockerfile)
  REFRAG_DOCKER_GPUS     host GPU indices jobs may use, e.g. 0,1,2,3 (default: nvidia-smi's)
  REFRAG_DOCKER_SHM      /dev/shm size of each container (default: 16g; NCCL needs it large)
  REFRAG_DOCKER_ARGS     extra `docker run` arguments (shell syntax), e.g. cache mounts
Only the standard library: this runs on the host, in or outside the project's environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

STATE_DIR = Path(".snakemake/docker")  # relative to the work tree (the cwd of snakemake)
PASSED_ENV = ("HF_TOKEN", "HF_ENDPOINT", "WANDB_API_KEY")  # passed by name, never written down


def client() -> list[str]:
    return shlex.split(os.environ.get("REFRAG_DOCKER", "docker"))


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
    cmd = [*client(), "run", "--detach", "--name", name, "--hostname", name[:63]]
    cmd += ["--label", f"refrag.workdir={workdir}", "--label", f"refrag.rule={props.get('rule')}"]
    cmd += ["--user", f"{os.getuid()}:{os.getgid()}", "--volume", f"{workdir}:{workdir}"]
    cmd += ["--workdir", workdir, "--shm-size", os.environ.get("REFRAG_DOCKER_SHM", "16g")]
    # HOME: the invoking uid may have no home in the image; PYTHONPATH: the bind-mounted
    # work tree's `refrag` wins over the copy installed in the image.
    cmd += ["--env", "HOME=/tmp", "--env", f"PYTHONPATH={workdir}"]
    cmd += [arg for var in PASSED_ENV if var in os.environ for arg in ("--env", var)]
    if gpus:
        cmd += ["--gpus", f'"device={",".join(gpus)}"']
    cmd += shlex.split(os.environ.get("REFRAG_DOCKER_ARGS", ""))
    image = os.environ.get("REFRAG_DOCKER_IMAGE", "refrag-workflow:latest")
    return [*cmd, image, "/bin/sh", os.path.abspath(jobscript)]


def submit(jobscript: str) -> None:
    props = job_properties(jobscript)
    rule = re.sub(r"[^a-zA-Z0-9_.-]", "_", str(props.get("rule", "job")))
    name = f"snakejob-{rule}-{props.get('jobid', 0)}-{uuid.uuid4().hex[:8]}"
    gpus = int(props.get("resources", {}).get("gpu", 0) or 0)
    claimed = claim_gpus(gpus, name) if gpus > 0 else []
    subprocess.run(run_command(jobscript, props, claimed, name), check=True, stdout=sys.stderr)
    print(name)


def status(name: str) -> None:
    out = subprocess.run(
        [*client(), "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        print(f"docker_job.py: container {name} is gone: {out.stderr.strip()}", file=sys.stderr)
        print("failed")
        return
    state, code = (out.stdout.split() + ["1"])[:2]
    if state in ("created", "running", "restarting", "paused"):
        print("running")
        return
    logs = STATE_DIR / "logs" / f"{name}.log"
    logs.parent.mkdir(parents=True, exist_ok=True)
    with open(logs, "w") as fh:
        subprocess.run([*client(), "logs", name], stdout=fh, stderr=subprocess.STDOUT)
    subprocess.run([*client(), "rm", "--force", name], capture_output=True)
    if code == "0":
        print("success")
    else:
        print(f"docker_job.py: {name} exited with {code}; its output: {logs}", file=sys.stderr)
        print("failed")


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
