"""Stable Diffusion itself: model specs and loading, the families (SD 1.x, 2.x, SDXL), tokenizers,
embedding file formats, placeholder rows, generation, and the demo model.
"""
