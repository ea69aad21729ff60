"""`python -m nodekit`."""

from nodekit.cli import main

main()
