"""The studio's screens (1 Library, 2 Train, 3 Generate, 4 Metrics), help and modal dialogs."""
