"""The scheduling policy (a pure core) and what it is built from."""
