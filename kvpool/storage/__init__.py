"""The storage core: the backend protocol and capabilities, the registry, and the parts backends share
(extent allocator, aligned/huge-page buffers, eviction policies)."""
