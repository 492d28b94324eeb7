"""Collection settings shared by the test suite and the library's doctests."""

# Doctests that build and train networks for tens of seconds each; their modules are covered by
# tests/test_venom_network.py, tests/test_venom_train.py and tests/test_priors.py, and the examples
# run with `python -m pytest --doctest-modules <module>`.
collect_ignore = [
    "jaxleak/attacks/venom/network.py",
    "jaxleak/attacks/venom/infer.py",
    "jaxleak/priors/flow.py",
]
