"""Test helpers shipped with kvpool: the backend conformance suite every backend's tests subclass.

    from kvpool.testing import BackendTests

    class TestMyStore(BackendTests):
        async def make_backend(self, tmp_path, capacity):
            return MyStore(capacity=capacity)
"""

from .backend_tests import BackendTests

__all__ = ["BackendTests"]
