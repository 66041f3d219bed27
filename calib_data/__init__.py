"""The default calibration set (data only): see README.md and index.json in this folder."""
