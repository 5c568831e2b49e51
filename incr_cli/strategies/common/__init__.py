"""What several methods share: their base classes and helpers, each in a module named for what it is. Every
module of incr_cli/strategies outside this package is one method (or `base.py`, the contract)."""
