"""The simulated machine: a world model plus ordinary backends for every part."""
