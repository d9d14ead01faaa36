"""Benchmarks: aiso against a raw aio-pika relay (the floor) and Celery. See README.md."""
