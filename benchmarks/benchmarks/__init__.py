"""asv benchmark suites of mlocore (see ``asv.conf.json`` at the repository top).

Modules: ``hypergrad`` (hypergradient methods at equal accuracy, oracle calls, errors,
peak memory of unrolled vs implicit), ``linalg`` (linear solvers vs scipy),
``compile`` (first-call compile time in fresh processes); ``common`` builds the dense
quadratic bilevel problem with a closed-form hypergradient that they all use.
"""
