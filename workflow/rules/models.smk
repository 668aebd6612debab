rule fetch_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/fetch_model/{model}.log",
    conda:
        CONDA_ENV
    params:
        spec=lambda wc: model_spec(wc.model),
    script:
        "../scripts/fetch_model.py"
