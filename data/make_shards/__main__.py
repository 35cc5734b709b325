"""``python -m data.make_shards``: the command line of ``data/make_shards/__init__.py``."""

from . import main

main()
