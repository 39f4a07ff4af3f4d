"""``python -m relex`` is the ``relex`` command."""

from relex.cli import run

run()
