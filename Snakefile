# REFRAG experiment workflow: data → alignment → training stages → evaluation → report.
# Usage: snakemake --profile local eval_report   (see README.md)
from snakemake.utils import min_version

min_version("9.27")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/config.smk"


# Every rule's software: this image under --sdm apptainer, the conda environment each rule
# names (workflow/envs/refrag.yaml) under --sdm conda; without either, the project's .venv.
container: config["container"]


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/corpus.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/retrieval.smk"
include: "workflow/rules/distributed.smk"
include: "workflow/rules/report.smk"


# Here, not in an included file: Snakemake restores the default target after each include, so
# a `default_target` set there is lost (and `snakemake --report` then sees an empty DAG).
rule all:
    """Default target: the report."""
    default_target: True
    input:
        "results/report.html",
