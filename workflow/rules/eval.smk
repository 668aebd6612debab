rule eval_baselines:
    """Log-perplexity of the plain decoder with no context, the full context as tokens, and the
    lowercased context as tokens."""
    input:
        shards="results/shards/{corpus}/{decoder}/{encoder}/{eval_set}",
        decoder="resources/models/{decoder}",
        encoder="resources/models/{encoder}",
    output:
        "results/eval/{corpus}/{decoder}/{encoder}/{eval_set}/baselines.json",
    log:
        "logs/eval_baselines/{corpus}/{decoder}/{encoder}/{eval_set}.log",
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
    params:
        final_stage=final_stage(config["eval"]["stages"]),
        bootstrap={"seed": config["seed"]} | config["eval"]["bootstrap"],
    script:
        "../scripts/perplexity_table.py"
