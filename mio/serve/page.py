"""The chat page served at ``/``."""

PAGE = "<!doctype html><title>mio</title>"
