"""Fault injection: the blockdrv-fuzz runner, its proxy, model and server control."""
