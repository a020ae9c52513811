"""A tier striped over several devices, with bandwidth-weighted placement and its probes."""
