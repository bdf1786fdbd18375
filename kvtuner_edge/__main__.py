"""python -m kvtuner_edge: the command line without the installed entry point."""
from .cli import main

main()
