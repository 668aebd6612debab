import re

from refrag.train.stages import (
    STAGES,
    final_stage,
    qa_stages,
    stage_with_role,
    stages_to_train,
)

# every rule's conda environment (--sdm conda), relative to the rule files
CONDA_ENV = "../envs/refrag.yaml"


# --- config accessors ---
def model_spec(model):
    return config["models"][model]


SPLITS = ["train", "validation", "test"]
CORPUS = config["corpus"]["name"]


def fetched_corpus(wildcards):
    """Embedded and hf: corpora are fetched first; a local folder is read in place."""
    if config["corpus"]["source"].startswith(("embedded:", "hf:")):
        return f"resources/corpus/{wildcards.corpus}/source"
    return []


wildcard_constraints:
    corpus=re.escape(CORPUS),  # the corpus rules make the configured corpus only
    k=r"\d+",
    split="|".join(SPLITS),
    stage="|".join(STAGES),


def find_run(wildcards):
    """The config run that a job's decoder/encoder/k wildcards belong to."""
    for run in config["runs"]:
        if (run["decoder"], run["encoder"]) == (
            wildcards.decoder,
            wildcards.encoder,
        ) and int(wildcards.k) in run["k"]:
            return run
    raise ValueError(
        f"no run in the config has decoder={wildcards.decoder}, encoder={wildcards.encoder}, k={wildcards.k}"
    )


# what each kind of `Stage.data` is in this workflow's layout
STAGE_DATA = {
    "alignment": "results/alignment/{corpus}/{decoder}/{encoder}/train.parquet",
    "shards": "results/shards/{corpus}/{decoder}/{encoder}/train",
}
INPUT_RULE = {
    "data": {"alignment": "align_pairs", "shards": "tokenize"},
    "init": "train",
}
CHECKPOINT = "results/checkpoints/{corpus}/{decoder}/{encoder}/k{k}/{stage}"
HELDOUT = "results/shards/{corpus}/{decoder}/{encoder}/validation"
HELDOUT_BASELINES = "results/heldout/{corpus}/{decoder}/{encoder}/baselines.json"
QA_SET = "results/qa/{corpus}/{decoder}/{encoder}/{eval_set}.jsonl"
QA_BASELINES = "results/eval/{corpus}/{decoder}/{encoder}/{eval_set}/qa/baselines.json"
QA_EVAL = "results/eval/{corpus}/{decoder}/{encoder}/{eval_set}/qa/k{k}-{stage}.json"


def run_keys():
    """(decoder, encoder, k) of every configured run."""
    return [(r["decoder"], r["encoder"], k) for r in config["runs"] for k in r["k"]]


def pair_keys():
    return sorted({(d, e) for d, e, _ in run_keys()})


def selective_keys():
    """(decoder, encoder, k) of the runs evaluated with selective compression."""
    return [key for key in run_keys() if key[2] in config["eval"]["selective"]["k"]]


def qa_keys():
    """(decoder, encoder, k) of the runs evaluated on QA (and fine-tuned by the sft stage)."""
    return [key for key in run_keys() if key[2] in config["eval"]["qa"]["k"]]


def eval_outputs():
    """Every evaluation JSON the perplexity table is made of."""
    files = []
    for eval_set in config["eval"]["sets"]:
        for decoder, encoder in pair_keys():
            files.append(
                f"results/eval/{CORPUS}/{decoder}/{encoder}/{eval_set}/baselines.json"
            )
        for decoder, encoder, k in run_keys():
            for stage in config["eval"]["stages"]:
                files.append(
                    f"results/eval/{CORPUS}/{decoder}/{encoder}/{eval_set}/k{k}-{stage}.json"
                )
        for decoder, encoder, k in selective_keys():
            files.append(
                f"results/eval/{CORPUS}/{decoder}/{encoder}/{eval_set}/k{k}-selective.json"
            )
    return files


QA_STAGE = stage_with_role(
    "qa"
)  # fine-tuned for QA (sft); QA also asks the stage before it
SELECTIVE_STAGE = stage_with_role("selective")  # its checkpoints hold the chunk policy


def qa_variants(stage):
    """How a stage's checkpoint reads the QA passages: all three ways after the QA stage, the
    policy expanding a fraction p of the chunks (refrag_rl) for the selective stage, else as
    chunk embeddings."""
    if stage == QA_STAGE:
        return ["no_context", "full_context", "refrag"]
    return ["refrag_rl"] if stage == SELECTIVE_STAGE else ["refrag"]


def qa_outputs():
    """Every QA JSON the QA table is made of: the base decoder's baselines (without SFT),
    REFRAG from the stage the QA stage starts from at every k that trains it, all three
    variants after the QA stage (at eval.qa.k), and the selective stage's policy (refrag_rl,
    without SFT) at eval.selective.k, for the decoder/encoder pairs QA evaluates."""
    before, qa = qa_stages()
    pairs = {(d, e) for d, e, _ in qa_keys()}
    files = []
    for eval_set in config["eval"]["sets"]:
        where = {"corpus": CORPUS, "eval_set": eval_set}
        for decoder, encoder in sorted(pairs):
            files.append(QA_BASELINES.format(decoder=decoder, encoder=encoder, **where))
        for decoder, encoder, k in run_keys():
            trained = stages_to_train(config["eval"], k)
            files += [
                QA_EVAL.format(
                    decoder=decoder, encoder=encoder, k=k, stage=stage, **where
                )
                for stage in (before, qa)
                if (decoder, encoder) in pairs and stage in trained
            ]
        files += [
            QA_EVAL.format(
                decoder=decoder, encoder=encoder, k=k, stage=SELECTIVE_STAGE, **where
            )
            for decoder, encoder, k in selective_keys()
            if (decoder, encoder) in pairs
        ]
    return files


# --- a streamed corpus (corpus.streamed): its shard files, one job each (corpus.smk, data.smk) ---
from functools import cache

from refrag.data.corpus import part_name, shard_files

STREAMED = config["corpus"]["streamed"]
EVAL_SPLITS = ["validation", "test"]


HUB_STREAMED = STREAMED and config["corpus"]["source"].startswith("hf:")


@cache
def corpus_parts():
    """{part: what it reads} of a streamed corpus, known when the workflow is planned (part:
    00000, 00001, ...): a folder's shard files, listed once; an hf: dataset's corpus.shards
    parts (their files are listed by each job at run time: planning needs no network).
    """
    if HUB_STREAMED:
        return {f"{i:05d}": i for i in range(config["corpus"]["shards"])}
    return {
        f"{i:05d}": str(p)
        for i, p in enumerate(shard_files(config["corpus"]["source"]))
    }


def part_input(wildcards):
    """A folder part's shard file (an input); an hf: part has none."""
    return {} if HUB_STREAMED else {"shard": corpus_parts()[wildcards.part]}


def part_name_of(wildcards):
    """The job's shard's name in its corpus (the prefix of its documents' ids); an hf:
    part names each of its files at run time."""
    if HUB_STREAMED:
        return ""
    shard = corpus_parts()[wildcards.part]
    return part_name(shard, config["corpus"]["source"])


# --- retrieval and RAG (workflow/rules/retrieval.smk) ---
RAG_EVAL = "results/eval/{corpus}/{decoder}/{encoder}/{eval_set}/rag/{retriever}/k{k}-{stage}.json"

RAG_REPORT = {  # eval_report's inputs when RAG is evaluated
    "rag": "results/eval/rag.csv",
    "retrieval": "results/eval/retrieval.csv",
    "rag_equal": "results/eval/rag_equal_latency.csv",
    "rag_plot": "results/plots/rag.png",
}
if config["retrieval"]["encoder"] not in config["models"]:
    raise ValueError(
        f"config retrieval.encoder: {config['retrieval']['encoder']!r} is not a key of `models`"
    )
if config["retrieval"]["rag"]["k"] and set(config["eval"]["sets"]) - set(
    config["retrieval"]["splits"]
):
    raise ValueError(
        f"config retrieval.splits: {config['retrieval']['splits']} must hold every eval set "
        f"{config['eval']['sets']} (their questions' sources are retrieved)"
    )


def rag_outputs():
    """Every RAG evaluation JSON: each run at the k values retrieval.rag.k lists, each eval set."""
    return [
        RAG_EVAL.format(
            corpus=CORPUS,
            decoder=d,
            encoder=e,
            eval_set=s,
            retriever=config["retrieval"]["encoder"],
            k=k,
            stage=QA_STAGE,
        )
        for d, e, k in run_keys()
        if k in config["retrieval"]["rag"]["k"]
        for s in config["eval"]["sets"]
    ]
