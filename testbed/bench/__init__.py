"""The performance and scale benchmark (``make bench``; ``python -m testbed.bench``).

Every figure is a median over repeats with its spread; where there is a baseline, the
ratio is measured in the same run (paired, back to back). The JSON layout
(``testbed.bench/1``) is documented in README.md, section "Benchmarks".
"""

SCHEMA = "testbed.bench/1"
SECTIONS = ("topology", "scenarios", "fidelity", "unshaped", "many_connections",
            "attack_rate")
