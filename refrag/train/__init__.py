"""Training: the stage registry, datasets, trainers, resume, held-out curve, SFT, selective
stages and torchrun helpers. May import eval (held-out scoring), data, modeling, io."""
