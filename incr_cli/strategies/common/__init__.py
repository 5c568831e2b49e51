"""What several methods share: their base classes and helpers, each in a module named for what it is, apart
from the methods' own modules in incr_cli/strategies."""
