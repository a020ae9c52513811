"""Build the native io_uring engine (kernel uapi headers only, no liburing)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvpool._uring",
            sources=["kvpool/native/uring.c"],
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
