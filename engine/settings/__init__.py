"""Job settings and their checks, torch-free: training (`TrainConfig`, sweep members), generation
requests, samplers, prompt sets. The CLI, the studio and the engine's door validate with these.
"""
