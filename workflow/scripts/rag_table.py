import json
from pathlib import Path

import pandas as pd

from refrag.eval.rag import equal_latency, rag_table, recall_table
from refrag.eval.tables import write_table
from refrag.io.runtime import log_to

with log_to(snakemake.log[0]):
    bootstrap = {"samples": 1000} | snakemake.params.bootstrap
    rag, recall, equal = [], [], []
    for path in snakemake.input:
        result = json.loads(Path(path).read_text())
        labels = {k: result["run"][k] for k in ("decoder", "encoder", "eval_set", "retriever")}
        table = rag_table(result, **bootstrap).assign(**labels)
        rag.append(table)
        equal.append(equal_latency(table).assign(**labels, k=result["run"]["k"]))
        recall.append(
            recall_table(result["recall"], snakemake.params.recall_n, **bootstrap).assign(
                **labels, index_passages=result["run"]["index_passages"]
            )
        )
    for frames, out in [
        (rag, snakemake.output.rag),
        (recall, snakemake.output.recall),
        (equal, snakemake.output.equal),
    ]:
        frame = pd.concat(frames, ignore_index=True)
        write_table(frame, out)
        print(frame.to_string(index=False))
