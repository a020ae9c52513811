"""Memory tiers: host DRAM (``dram://``) and GPU memory (``gpu://``), over one shared arena bookkeeping."""
