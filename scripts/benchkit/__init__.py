"""The benchmark behind scripts/bench.py (see that file's docstring for what is measured and how).

Imported with scripts/ on sys.path, as ``python scripts/bench.py`` has it.
"""
