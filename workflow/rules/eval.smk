rule eval_baselines:
    """Log-perplexity of the plain decoder with no context, the full context as tokens,
    and the context as the encoder sees it (its tokens decoded): the ceiling."""
    input:
        shards="results/shards/{corpus}/{decoder}/{encoder}/{eval_set}",
        decoder="resources/models/{decoder}",
        encoder="resources/models/{encoder}",
    output:
        "results/eval/{corpus}/{decoder}/{encoder}/{eval_set}/baselines.json",
    log:
        "logs/eval_baselines/{corpus}/{decoder}/{encoder}/{eval_set}.log",
    conda:
        CONDA_ENV
    threads: 1
    params:
        batch_size=config["eval"]["batch_size"],
    script:
        "../scripts/eval_ppl.py"


rule heldout_baselines:
    """The held-out curve's baselines: the base decoder on the validation windows with no
    context and the full context (once for every k; no eval.* value reruns it)."""
    input:
        shards=HELDOUT,
        decoder="resources/models/{decoder}",
        encoder="resources/models/{encoder}",
    output:
        HELDOUT_BASELINES,
    log:
        "logs/heldout_baselines/{corpus}/{decoder}/{encoder}.log",
    priority: 10  # every cpt job waits on it
    conda:
        CONDA_ENV
    threads: 1
    params:
        batch_size=8,
        variants=["no_context", "full_context"],
    script:
        "../scripts/eval_ppl.py"


rule eval_refrag:
    """Log-perplexity of a REFRAG checkpoint reading the context as chunk embeddings."""
    input:
        shards="results/shards/{corpus}/{decoder}/{encoder}/{eval_set}",
        checkpoint=CHECKPOINT,
    output:
        "results/eval/{corpus}/{decoder}/{encoder}/{eval_set}/k{k}-{stage}.json",
    log:
        "logs/eval_refrag/{corpus}/{decoder}/{encoder}/{eval_set}/k{k}-{stage}.log",
    conda:
        CONDA_ENV
    threads: 1
    params:
        batch_size=config["eval"]["batch_size"],
    script:
        "../scripts/eval_ppl.py"


rule perplexity_table:
    """results/eval/perplexity.csv: one row per variant × k × evaluation set, with 95%
    intervals (bootstrap over documents); refuses rows that scored different tokens."""
    input:
        eval_outputs(),
    output:
        report(
            "results/eval/perplexity.csv",
            caption="../report/perplexity_table.rst",
            category="Evaluation",
        ),
    log:
        "logs/perplexity_table.log",
    conda:
        CONDA_ENV
    params:
        final_stage=final_stage(config["eval"]["stages"]),
        bootstrap={"seed": config["seed"]} | config["eval"]["bootstrap"],
    script:
        "../scripts/perplexity_table.py"


rule eval_selective:
    """Selective compression: a fraction p of each context's chunks read as tokens, chosen by
    the policy (refrag_rl), at random or by the perplexity heuristic, all read by the selective
    stage's (policy's) mixed-input model."""
    input:
        shards="results/shards/{corpus}/{decoder}/{encoder}/{eval_set}",
        checkpoint=lambda wc: CHECKPOINT.format(**wc, stage=SELECTIVE_STAGE),
    output:
        "results/eval/{corpus}/{decoder}/{encoder}/{eval_set}/k{k}-selective.json",
    log:
        "logs/eval_selective/{corpus}/{decoder}/{encoder}/{eval_set}/k{k}.log",
    priority: 5  # the last of the longest chain (cpt, mixed, policy, this)
    conda:
        CONDA_ENV
    threads: 1
    params:
        fractions=config["eval"]["selective"]["p"],
        seed=config["seed"],
    script:
        "../scripts/eval_selective.py"


rule qa_set:
    """The cloze QA set of an eval set's documents (refrag.data.qa.build_qa_set): its own cut
    of windows (eval.qa.max_windows), a sentence of a held-out passage with a name or number
    blanked, with candidate answers for the multiple-choice score."""
    input:
        corpus="results/corpus/{corpus}/{eval_set}.parquet",
        manifest="results/corpus/{corpus}/manifest.json",
        decoder="resources/models/{decoder}",
        encoder="resources/models/{encoder}",
    output:
        QA_SET,
    log:
        "logs/qa_set/{corpus}/{decoder}/{encoder}/{eval_set}.log",
    conda:
        CONDA_ENV
    params:
        seed=config["seed"],
        per_passage=config["eval"]["qa"]["per_passage"],
        max_windows=config["eval"]["qa"]["max_windows"],
        choices=config["eval"]["qa"]["choices"],
        context_tokens=config["data"]["context_tokens"],
        target_tokens=config["data"]["target_tokens"],
    script:
        "../scripts/qa_set.py"


rule eval_qa_baselines:
    """QA without SFT by the base decoder: no context, and the passage as tokens."""
    input:
        qa_set=QA_SET,
        decoder="resources/models/{decoder}",
        encoder="resources/models/{encoder}",
    output:
        QA_BASELINES,
    log:
        "logs/eval_qa/{corpus}/{decoder}/{encoder}/{eval_set}/baselines.log",
    priority: 1  # long, and nothing waits on it: before the short evaluations, after training
    conda:
        CONDA_ENV
    threads: 1
    params:
        variants=["no_context", "full_context"],
        max_new_tokens=config["eval"]["qa"]["max_new_tokens"],
        batch_size=config["eval"]["qa"]["batch_size"],
    script:
        "../scripts/eval_qa.py"


rule eval_qa:
    """QA by a REFRAG checkpoint: before the QA stage (cpt, no SFT) the passage as chunk
    embeddings; after it (sft) also no context and the passage as tokens, fine-tuned; the
    selective stage's (policy, no SFT) with a fraction p of the chunks read as tokens.
    """
    input:
        qa_set=QA_SET,
        checkpoint=CHECKPOINT,
    output:
        QA_EVAL,
    log:
        "logs/eval_qa/{corpus}/{decoder}/{encoder}/{eval_set}/k{k}-{stage}.log",
    priority: 5  # the longest evaluation (three variants after sft): start it first
    conda:
        CONDA_ENV
    threads: 1
    params:
        variants=lambda wc: qa_variants(wc.stage),
        fractions=lambda wc: (
            config["eval"]["selective"]["p"] if wc.stage == SELECTIVE_STAGE else []
        ),
        sft=lambda wc: wc.stage == QA_STAGE,
        max_new_tokens=config["eval"]["qa"]["max_new_tokens"],
        batch_size=config["eval"]["qa"]["batch_size"],
    script:
        "../scripts/eval_qa.py"


rule qa_table:
    """results/eval/qa.csv: exact match and F1 per variant × k × SFT, with 95% intervals
    (bootstrap over documents); refuses rows that answered different questions."""
    input:
        qa_outputs(),
    output:
        report(
            "results/eval/qa.csv",
            caption="../report/qa_table.rst",
            category="Evaluation",
        ),
    log:
        "logs/qa_table.log",
    conda:
        CONDA_ENV
    params:
        bootstrap={"seed": config["seed"]} | config["eval"]["bootstrap"],
    script:
        "../scripts/qa_table.py"
