"""Calibration, FP8 math and fidelity reports. No ComfyUI UI code here: nodes/ adapts these to the graph."""
