# REFRAG experiment workflow: data → alignment → training stages → evaluation → report.
# Usage: snakemake --profile local eval_report   (see README.md)
from snakemake.utils import min_version

min_version("9.27")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/corpus.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/distributed.smk"
include: "workflow/rules/report.smk"
