"""Shared remote tiers: Redis/Valkey and Mooncake Store, over one object format (parts, checksums)."""
