import json
from pathlib import Path

from refrag.eval.qa import qa_table
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    rows = [row for path in snakemake.input for row in json.loads(Path(path).read_text())]
    table = qa_table(rows, **({"samples": 1000} | snakemake.params.bootstrap))
    table.to_csv(snakemake.output[0], index=False)
    print(table.to_string(index=False))
