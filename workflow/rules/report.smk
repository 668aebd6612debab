# Every table and plot the report shows is a rule output flagged report(...) with a caption
# (workflow/report/*.rst), so `snakemake --report results/report.zip` carries them too.


rule rulegraph:
    """The rule graph of this run's config (handed to the inner Snakemake), as SVG (graphviz
    `dot`); redrawn whenever the config changes."""
    output:
        report("results/dag.svg", caption="../report/dag.rst", category="Rule graph"),
    log:
        "logs/rulegraph.log",
    conda:
        CONDA_ENV
    params:
        config=config,
        target="eval_report",
    script:
        "../scripts/rulegraph.py"


rule bench_ttft:
    """Time to first token of one decoder/encoder pair: plain decoder vs REFRAG (cached and
    recomputed chunk embeddings)."""
    input:
        decoder="resources/models/{decoder}",
        encoder="resources/models/{encoder}",
    output:
        "results/bench/{decoder}/{encoder}/ttft.json",
    log:
        "logs/bench_ttft/{decoder}/{encoder}.log",
    priority: 20  # the one job on every core: it starts whenever every core is free at once
    conda:
        CONDA_ENV
    threads: whole_machine  # nothing runs beside a timing
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


rule ttft_table:
    """results/bench/ttft.json (+ .csv): the TTFT rows of every decoder/encoder pair."""
    input:
        expand(
            "results/bench/{pair[0]}/{pair[1]}/ttft.json",
            pair=pair_keys(),
        ),
    output:
        json="results/bench/ttft.json",
        csv=report(
            "results/bench/ttft.csv",
            caption="../report/ttft_table.rst",
            category="Speed",
        ),
    log:
        "logs/ttft_table.log",
    conda:
        CONDA_ENV
    params:
        labels=[{"decoder": d, "encoder": e} for d, e in pair_keys()],
    script:
        "../scripts/ttft_table.py"


rule plot_perplexity:
    """Log-perplexity vs compression k, baselines as horizontal lines."""
    input:
        "results/eval/perplexity.csv",
    output:
        report(
            "results/plots/perplexity.png",
            caption="../report/perplexity.rst",
            category="Evaluation",
        ),
    log:
        "logs/plot_perplexity.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/plot_perplexity.py"


rule plot_training:
    """Training loss per step of every stage (registry order) and run."""
    input:
        checkpoints(),
    output:
        report(
            "results/plots/training.png",
            caption="../report/training.rst",
            category="Training",
        ),
    log:
        "logs/plot_training.log",
    conda:
        CONDA_ENV
    params:
        labels=checkpoint_labels(),
    script:
        "../scripts/plot_training.py"


rule plot_ttft:
    """TTFT speedup over the plain decoder vs context length."""
    input:
        "results/bench/ttft.json",
    output:
        report("results/plots/ttft.png", caption="../report/ttft.rst", category="Speed"),
    log:
        "logs/plot_ttft.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/plot_ttft.py"


rule eval_report:
    """results/report.html (+ report.md): the tables, plots and DAG above in one page."""
    input:
        unpack(lambda wc: {"qa": "results/eval/qa.csv"} if qa_keys() else {}),
        unpack(lambda wc: RAG_REPORT if rag_outputs() else {}),
        perplexity="results/eval/perplexity.csv",
        ttft="results/bench/ttft.csv",
        perplexity_plot="results/plots/perplexity.png",
        training_plot="results/plots/training.png",
        ttft_plot="results/plots/ttft.png",
        dag="results/dag.svg",
    output:
        html=report(
            "results/report.html", caption="../report/report.rst", category="Report"
        ),
        md="results/report.md",
    log:
        "logs/eval_report.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/eval_report.py"


localrules:
    all,
    perplexity_table,
    qa_set,
    qa_table,
    rulegraph,
    ttft_table,
    plot_perplexity,
    plot_training,
    plot_ttft,
    eval_report,
