"""matta's conformance suite (DESIGN §7): run it against any backend with ``--backends``."""
