"""Training and evaluation data: procedural paired chest-radiograph phantoms
(`bsldm_fast.data.phantom`) and the data engine that makes realistic pairs from a few real
CXR / soft-tissue pairs (`bsldm_fast.data.engine`)."""
