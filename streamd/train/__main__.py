"""``python -m streamd.train train {digits,speaker} [...]`` without the main CLI."""

from streamd.train.cli import main

raise SystemExit(main())
