"""``python -m app.cli``: the same as the ``ftaas`` console script."""

from app.cli.commands import main

main()
