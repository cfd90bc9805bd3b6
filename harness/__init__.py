"""Development harness: seeded model fixtures and a real ComfyUI host for tests, demo and benchmarks.

Not imported by ComfyUI when the pack is loaded.
"""
