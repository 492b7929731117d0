"""Checks shared by the zoo test and the zoo benchmark (not part of the public API)."""
