import json
from pathlib import Path

from refrag.eval.perplexity import perplexity_table
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    rows = [row for path in snakemake.input for row in json.loads(Path(path).read_text())]
    table = perplexity_table(
        rows,
        final_stage=snakemake.params.final_stage,
        bootstrap=snakemake.params.bootstrap,
    )
    table.to_csv(snakemake.output[0], index=False)
    print(table.to_string(index=False))
