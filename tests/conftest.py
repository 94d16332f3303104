import os

# Tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile many small programs and run each a few times, so XLA's
# compile time dominates; its lowest backend optimization level compiles them
# about twice as fast. Set before JAX is imported; results stay exact within a process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
