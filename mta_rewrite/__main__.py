"""``python -m mta_rewrite``: the ``mta-rewrite`` command line, where the console script is not
on the PATH (a virtual environment not activated, a notebook's ``!python -m``)."""

from .cli import main

main()
