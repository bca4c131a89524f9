"""Synthetic training and evaluation data: procedural paired chest-radiograph phantoms
(`bsldm_fast.data.phantom.generate`, `bsldm_fast.data.phantom.write_dataset`)."""
