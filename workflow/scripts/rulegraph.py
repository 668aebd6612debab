import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from refrag.io.runtime import log_to

# The outer run's effective config goes to the inner Snakemake, so the graph is this run's.
with log_to(snakemake.log[0]), tempfile.TemporaryDirectory() as tmp:
    configfile = Path(tmp, "config.yaml")
    configfile.write_text(yaml.safe_dump(dict(snakemake.params.config)))
    command = [sys.executable, "-m", "snakemake", "--rulegraph", "dot", snakemake.params.target]
    command += ["--nolock", "--configfile", str(configfile)]
    graph = subprocess.run(command, capture_output=True, text=True)
    print(graph.stderr)
    graph.check_returncode()
    svg = subprocess.run(["dot", "-Tsvg"], input=graph.stdout.encode(), capture_output=True)
    print(svg.stderr.decode())
    svg.check_returncode()
    Path(snakemake.output[0]).write_bytes(svg.stdout)
