rule hello_dist:
    """The seed's minimal distributed app: torchrun, one log per rank."""
    output:
        "results/hello_dist/world.json",
    log:
        torchrun="logs/hello_dist/torchrun.log",
        ranks=directory("logs/hello_dist/ranks"),
    conda:
        CONDA_ENV
    threads: config["hello_dist"]["nproc"]
    params:
        nproc=config["hello_dist"]["nproc"],
        python=PYTHON,
    shell:
        "{params.python} -m torch.distributed.run --standalone --nproc_per_node={params.nproc} "
        "--log-dir={log.ranks}/torchrun -m refrag.cli hello-dist "
        "--out {output} --rank-log-dir {log.ranks} > {log.torchrun} 2>&1"
