import os

# Tests run on the CPU; keep XLA from grabbing every core per process when xdist runs workers.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
