"""Scoring models on verifiable problems: a user's dataset (``dataset``), one chat rendering (``chat``),
math-verify grading (``grading``) and greedy batched decoding (``scoring``). Used by ``relex eval``,
``--verify`` and the lab; needs the ``eval`` extra (transformers, math-verify)."""
