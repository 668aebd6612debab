import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# The outer run's effective config goes to the inner Snakemake, so the graph is this run's.
with open(snakemake.log[0], "w") as log, tempfile.TemporaryDirectory() as tmp:
    configfile = Path(tmp, "config.yaml")
    configfile.write_text(yaml.safe_dump(dict(snakemake.params.config)))
    command = [sys.executable, "-m", "snakemake", "--rulegraph", "dot", "--nolock"]
    command += ["--configfile", str(configfile), snakemake.params.target]
    graph = subprocess.run(command, check=True, capture_output=True, text=True)
    log.write(graph.stderr)
    svg = subprocess.run(["dot", "-Tsvg"], input=graph.stdout, check=True, capture_output=True)
    Path(snakemake.output[0]).write_bytes(svg.stdout)
