"""Byte transports: TCP, Unix and TLS streams for trio, and TLS contexts."""
