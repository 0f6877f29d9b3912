"""The one C extension (everything else is in pyproject.toml).

``sidecar.kafka._batches`` builds and checks Kafka record batches (C99, no dependency). It is
optional: where it cannot be compiled the package uses aiokafka's own record builder.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("sidecar.kafka._batches", ["sidecar/kafka/_batches.c"], optional=True),
    ]
)
