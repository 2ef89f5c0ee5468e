"""The data directory, torch-free: paths and atomic writes, the concept library, images, runs
(the `Run` record and its event log), checkpoints, the words a concept's runs saved, and the
records the CLI and the studio read back.
"""
