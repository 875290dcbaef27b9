"""Model definition, training core and bundle export (trainer side, needs torch)."""
