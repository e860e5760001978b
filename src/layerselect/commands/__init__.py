"""One module per ``layerselect`` subcommand; each exposes ``register(subparsers)``."""
