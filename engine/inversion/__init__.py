"""Textual Inversion: the training loop, its optimizer, regularisers and data, initialising from
an embedding, the CLIP metrics, the word inspector, merging and importing words.
"""
