"""Settings shared by the whole test session (pytest imports this before any test module)."""

import os

# Most of the suite's time is XLA compiling hundreds of small programs that then run for
# milliseconds. XLA's CPU default (LLVM -O3) takes ~30 s to compile a threefry-heavy UNet
# initialiser that -O0 compiles in ~6 s; over whole files -O0 cut the CPU time of
# test_optimization_attacks.py by a third and of test_cli.py by 40% (the longer attack runs
# execute slower, but far less than the compilations gain; -O1 saved less). The level changes
# code generation, not float semantics (no fast-math at any level). Set before the CPU backend
# starts; subprocesses inherit it, and a level already given in XLA_FLAGS is kept.
_LEVEL = "--xla_backend_optimization_level"
if _LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_LEVEL}=0".strip()
