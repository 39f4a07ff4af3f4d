"""The lab: a whole RLVR run at toy scale (task, base model, GRPO, extrapolation, evaluation, report), offline on CPU.

Needs the ``[lab]`` extra; see docs/lab.md. Entry points: ``relex lab`` and ``relex eval``.
"""
