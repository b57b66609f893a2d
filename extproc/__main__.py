"""`python -m extproc` is the same as the `extproc` command."""

from extproc.cli import main

raise SystemExit(main())
