"""Evaluation: frozen features -> k-NN and linear probes -> MedMNIST-comparable ACC/AUC."""
