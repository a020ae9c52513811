"""CUDA helpers below the pool: host-memory registration, restore streams and events, paged KV views.
Everything here works (as no-ops or CPU tensors) without CUDA."""
