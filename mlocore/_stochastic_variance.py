"""Variance-reduced and corrected single-loop methods: STABLE, SUSTAIN, MRBO, VRBO.

Each entry is a :class:`mlocore._stochastic.MethodSpec` (see that module).
"""
VARIANCE_METHODS = {}
