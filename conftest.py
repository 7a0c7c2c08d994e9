"""Test-session set-up shared by every test: 8 fake CPU devices and a compilation cache.

XLA reads its flags when the backend starts, so they are set here, before any test module
imports JAX.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # pylint: disable=g-import-not-at-top

_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
