"""`python -m qwen3next` is the `qwen3next` command."""

from qwen3next.cli import main

raise SystemExit(main())
