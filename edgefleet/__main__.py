"""`python -m edgefleet` is the `edgefleet` command."""

from edgefleet.cli import main

main()
