"""sorterd: the sorting daemon for rough blue sapphire melee."""

__version__ = "0.1.0"
