from refrag.eval.qa import qa_table
from refrag.eval.tables import read_rows, write_table
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    rows = read_rows(snakemake.input)
    table = qa_table(rows, **({"samples": 1000} | snakemake.params.bootstrap))
    write_table(table, snakemake.output[0])
    print(table.to_string(index=False))
