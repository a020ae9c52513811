"""Build the native io_uring engine (kernel uapi headers only, no liburing)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvpool._uring",
            # the ring (no Python), op encoding (no Python), and the CPython glue over both
            sources=["kvpool/native/uring_module.c", "kvpool/native/uring_ring.c", "kvpool/native/uring_ops.c"],
            depends=["kvpool/native/uring_ring.h", "kvpool/native/uring_ops.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
        ),
        Extension(
            "kvpool._vhost",
            sources=["kvpool/native/vhost_module.c", "kvpool/native/vhost_user.c"],
            depends=["kvpool/native/vhost_user.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
        ),
    ]
)
