"""Which attention kernel really ran: count calls of transformers' eager attention."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import transformers.models.bert.modeling_bert as bert
import transformers.models.llama.modeling_llama as llama


@contextmanager
def eager_attention_calls() -> Iterator[list[str]]:
    """Yield a list that gains the model family ("llama", "bert") at every eager-attention
    call made inside the block (the call itself still runs)."""
    calls: list[str] = []

    def spy(name, original):
        def eager(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return eager

    with ExitStack() as stack:
        for name, module in (("llama", llama), ("bert", bert)):
            stack.enter_context(
                mock.patch.object(
                    module, "eager_attention_forward", spy(name, module.eager_attention_forward)
                )
            )
        yield calls
