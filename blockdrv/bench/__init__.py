"""The benchmark engine behind ``blockdrv bench`` (trio and asyncio) and its latency
figures."""
