"""B-STaR: balanced self-taught reasoning on top of the engine."""
