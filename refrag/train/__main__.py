"""``python -m refrag.train --stage NAME …``: one training stage (what the workflow runs)."""

from refrag.train.runner import main

main()
