from pathlib import Path

from refrag.data.corpus import prepare_from_parts
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    manifest = prepare_from_parts(
        snakemake.input.parts,
        Path(snakemake.output.manifest).parent,
        splits=snakemake.params.splits,
    )
    print(manifest)
