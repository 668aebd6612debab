rule rulegraph:
    """The workflow's rule graph as SVG (graphviz `dot`)."""
    output:
        "results/dag.svg",
    log:
        "logs/rulegraph.log",
    conda:
        "../envs/refrag.yaml"
    params:
        python=PYTHON,
    shell:
        "({params.python} -m snakemake --rulegraph dot eval_report --nolock | dot -Tsvg > {output}) 2> {log}"


rule bench_ttft:
    """Time to first token: plain decoder vs REFRAG (cached and recomputed chunk embeddings)."""
    input:
        decoder=f"resources/models/{config['runs'][0]['decoder']}",
        encoder=f"resources/models/{config['runs'][0]['encoder']}",
    output:
        "results/bench/ttft.json",
    log:
        "logs/bench_ttft.log",
    conda:
        "../envs/refrag.yaml"
    threads: workflow.cores  # the whole machine: nothing runs beside a timing
    params:
        python=PYTHON,
        device=config["bench"]["device"],
        contexts=",".join(map(str, config["bench"]["contexts"])),
        k=",".join(map(str, config["bench"]["k"])),
        repeats=config["bench"]["repeats"],
    shell:
        "OMP_NUM_THREADS={threads} {params.python} benchmarks/ttft.py --device {params.device} --contexts {params.contexts} "
        "--k {params.k} --repeats {params.repeats} --threads {threads} --decoder {input.decoder} "
        "--encoder {input.encoder} --json {output} > {log} 2>&1"


rule eval_report:
    """results/report.html (+ report.md): tables, plots, training curves and the DAG."""
    input:
        perplexity="results/eval/perplexity.csv",
        checkpoints=[c for stage in STAGES for c in checkpoints(stage)],
        ttft="results/bench/ttft.json",
        dag="results/dag.svg",
    output:
        html=report(
            "results/report.html", caption="../report/report.rst", category="Report"
        ),
        md="results/report.md",
    log:
        "logs/eval_report.log",
    conda:
        "../envs/refrag.yaml"
    script:
        "../scripts/eval_report.py"


rule all:
    """Default target: the report."""
    default_target: True
    input:
        "results/report.html",


localrules:
    all,
    perplexity_table,
    rulegraph,
    eval_report,
