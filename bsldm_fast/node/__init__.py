"""A DICOM node: bone suppression as a PACS service (`bsldm-fast serve`).

A Storage SCP receives chest radiographs (C-STORE), spools them durably, runs them in batches
through one loaded model and stores the derived soft-tissue series back into the same study at
every destination (C-STORE SCU). See README, "Running as a DICOM node".
"""

from .config import (AccessSettings, Destination, FilterSettings, Limits, ModelSettings,
                     NodeConfig, NodeConfigError, TLSSettings, load_config)
from .scp import Node, status
from .spool import Spool

__all__ = ["AccessSettings", "Destination", "FilterSettings", "Limits", "ModelSettings", "Node",
           "NodeConfig", "NodeConfigError", "Spool", "TLSSettings", "load_config", "status"]
