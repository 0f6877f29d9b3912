"""Example models and traffic used by the README, the tests, the benchmark and the demo."""
