"""matta's conformance suite (docs/backends/index.md): ``python -m pytest --pyargs matta.spec_tests --backends=NAME``."""
