"""Data: readers and the MedMNIST catalogue -> an in-memory tensor store (see store.py)."""
