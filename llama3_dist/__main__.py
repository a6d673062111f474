"""`python -m llama3_dist ...` is the `llama3-dist` command."""

from .entrypoints.cli import main

raise SystemExit(main())
