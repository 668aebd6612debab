# Retrieval and RAG at equal latency (config `retrieval:`): a vector index of the corpus's
# passages, recall@n of the QA set's sources, and RAG answers by the QA stage's checkpoint
# reading the top-n passages as tokens or compressed, each with its TTFT measured in the job.


rule build_index:
    """A FAISS index of fixed-size passages of every document of the corpus (all splits),
    embedded by the sentence encoder retrieval.encoder (mean pooling, normalized)."""
    input:
        splits=expand("results/corpus/{{corpus}}/{split}.parquet", split=SPLITS),
        manifest="results/corpus/{corpus}/manifest.json",
        encoder="resources/models/{encoder}",
    output:
        directory("results/index/{corpus}/{encoder}"),
    log:
        "logs/build_index/{corpus}/{encoder}.log",
    conda:
        CONDA_ENV
    threads: 1
    params:
        passage_words=config["retrieval"]["passage_words"],
        overlap=config["retrieval"]["overlap"],
        batch_size=config["retrieval"]["batch_size"],
    script:
        "../scripts/build_index.py"


rule eval_rag:
    """Recall@n of the QA set's source documents, then RAG answers (exact match, F1, multiple
    choice) with no passage, the top-n passages as tokens and as chunk embeddings, each with
    its TTFT measured here (prefill, batch 1, chunk embeddings recomputed)."""
    input:
        index="results/index/{corpus}/{retriever}",
        qa_set=QA_SET,
        checkpoint=CHECKPOINT,
    output:
        RAG_EVAL,
    log:
        "logs/eval_rag/{corpus}/{decoder}/{encoder}/{eval_set}/{retriever}/k{k}-{stage}.log",
    conda:
        CONDA_ENV
    threads: 1
    params:
        recall_n=config["retrieval"]["recall_n"],
        tokens_n=config["retrieval"]["rag"]["tokens_n"],
        refrag_n=config["retrieval"]["rag"]["refrag_n"],
        questions=config["retrieval"]["rag"]["questions"],
        ttft_questions=config["retrieval"]["rag"]["ttft_questions"],
        ttft_repeats=config["retrieval"]["rag"]["ttft_repeats"],
        max_new_tokens=config["eval"]["qa"]["max_new_tokens"],
        batch_size=config["eval"]["qa"]["batch_size"],
    script:
        "../scripts/eval_rag.py"


rule rag_table:
    """results/eval/rag.csv (answers per variant and passages n, with TTFT),
    results/eval/retrieval.csv (recall@n) and results/eval/rag_equal_latency.csv, with 95%
    intervals by bootstrap over documents."""
    input:
        rag_outputs(),
    output:
        rag=report(
            "results/eval/rag.csv",
            caption="../report/rag_table.rst",
            category="Retrieval",
        ),
        recall=report(
            "results/eval/retrieval.csv",
            caption="../report/retrieval_table.rst",
            category="Retrieval",
        ),
        equal="results/eval/rag_equal_latency.csv",
    log:
        "logs/rag_table.log",
    conda:
        CONDA_ENV
    params:
        bootstrap={"seed": config["seed"]} | config["eval"]["bootstrap"],
        recall_n=config["retrieval"]["recall_n"],
    script:
        "../scripts/rag_table.py"


rule plot_rag:
    """Accuracy against retrieved passages and against TTFT, tokens vs REFRAG."""
    input:
        "results/eval/rag.csv",
    output:
        report(
            "results/plots/rag.png", caption="../report/rag.rst", category="Retrieval"
        ),
    log:
        "logs/plot_rag.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/plot_rag.py"


localrules:
    rag_table,
    plot_rag,
