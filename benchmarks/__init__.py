"""Scripts that print measured figures (a package so that one can use another's measurements)."""
